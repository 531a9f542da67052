// vmcgi under faults, hostile guests, bad input and shutdown: the real CLI,
// real QEMU, and the test guest (images/test-site) whose CGI scripts misbehave
// on purpose.

import { existsSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { connect } from 'node:net'
import { request } from 'undici'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { execa } from 'execa'
import { listeningAddresses } from '../support/proc.js'
import {
  allQemuProcesses, expectNoVms, mainJs, startVmcgi, testImage, writeConfig, type Vmcgi,
} from './harness.js'

/** Asks for `path` and reads the whole answer; a cut body is reported, not thrown. */
async function fetchAll(vmcgi: Vmcgi, path: string, options: Parameters<typeof request>[1] = {}) {
  const res = await request(`${vmcgi.url}${path}`, options)
  let body = ''
  let cut = false
  try {
    body = await res.body.text()
  } catch {
    cut = true
  }
  return { status: res.statusCode, vmcgiStatus: res.headers['vmcgi-status'], headers: res.headers, body, cut }
}

async function expectHealthy(vmcgi: Vmcgi): Promise<void> {
  const res = await request(`${vmcgi.url}/up`)
  expect(res.statusCode).toBe(200)
  await res.body.text()
}

describe('hostile and broken guests', () => {
  let vmcgi: Vmcgi
  beforeAll(async () => {
    vmcgi = await startVmcgi({ timeouts: { headersMs: 3_000, bodyIdleMs: 3_000, requestMs: 6_000 } }, testImage())
  })
  afterAll(async () => {
    await vmcgi.stop()
    expect(await allQemuProcesses()).toEqual([])
  })

  it.each([
    ['huge response headers', '/cgi-bin/huge-headers', 502, 'guest-bad-response'],
    ['garbage instead of HTTP', '/cgi-bin/garbage', 502, 'guest-bad-response'],
    ['no answer at all', '/cgi-bin/empty', 502, 'guest-unreachable'],
    ['no headers within timeouts.headersMs', '/cgi-bin/slow?30', 504, 'headers-timeout'],
    ['headers, then no body within timeouts.bodyIdleMs', '/cgi-bin/stall', 504, 'body-timeout'],
  ])('answers %s with the right status, and kills the VM', async (_what, path, status, reason) => {
    const answer = await fetchAll(vmcgi, path)
    expect(answer.status).toBe(status)
    expect(answer.vmcgiStatus).toBe(reason)
    await expectNoVms(vmcgi)
    await expectHealthy(vmcgi)
  })

  it.each([
    ['closing in the middle of the body', '/cgi-bin/close-mid-body'],
    ['powering off in the middle of the body', '/cgi-bin/poweroff'],
    ['an endless body, cut at timeouts.requestMs', '/cgi-bin/endless'],
    ['a body that drips a byte a second, cut at timeouts.requestMs', '/cgi-bin/drip'],
  ])('cuts the response on %s, and kills the VM', async (_what, path) => {
    const started = Date.now()
    const answer = await fetchAll(vmcgi, path)
    expect(answer.status).toBe(200)
    expect(answer.cut).toBe(true)
    expect(Date.now() - started).toBeLessThan(6_000 + 4_000)
    await expectNoVms(vmcgi)
    await expectHealthy(vmcgi)
  })

  it('keeps none of the guest\'s headers when its body fails before the first byte', async () => {
    const answer = await fetchAll(vmcgi, '/cgi-bin/stall')
    expect(answer.status).toBe(504)
    expect(answer.headers['set-cookie']).toBeUndefined()
    expect(answer.headers['vmcgi-vm-id']).toBeUndefined()
    expect(answer.body).toMatch(/^vmcgi: body-timeout: /)
  })

  it('logs why a response was cut', async () => {
    const answer = await fetchAll(vmcgi, '/cgi-bin/drip?log')
    expect(answer.cut).toBe(true)
    await expect.poll(() => vmcgi.logLines().find((line) => line.msg === 'request' && line.url === '/cgi-bin/drip?log')?.failure)
      .toBe('REQUEST_TIMEOUT')
  })
})

describe('clients that leave', () => {
  let vmcgi: Vmcgi
  beforeAll(async () => {
    vmcgi = await startVmcgi({}, testImage())
  })
  afterAll(() => vmcgi.stop())

  it.each([
    ['during boot', '/', 200],
    ['while the guest computes', '/cgi-bin/slow?30', 2_500],
    ['in the middle of the body', '/cgi-bin/drip', 3_000],
  ])('kill the VM at once when they leave %s', async (_what, path, afterMs) => {
    const abort = new AbortController()
    const pending = request(`${vmcgi.url}${path}`, { signal: abort.signal }).then((res) => res.body.text()).catch(() => 'aborted')
    await expect.poll(vmcgi.qemuChildren).toHaveLength(1)
    await new Promise((resolve) => setTimeout(resolve, afterMs))
    abort.abort()
    expect(await pending).toBe('aborted')
    await expectNoVms(vmcgi, 2_000)
    await expectHealthy(vmcgi)
  })
})

describe('bad input', () => {
  let vmcgi: Vmcgi
  beforeAll(async () => {
    vmcgi = await startVmcgi({ limits: { bodyLimitBytes: 1024 } }, testImage())
  })
  afterAll(() => vmcgi.stop())

  it('refuses a body over limits.bodyLimitBytes with 413 before any VM boots', async () => {
    const spawned = () => vmcgi.logLines().filter((line) => line.msg === 'QEMU spawned').length
    const before = spawned()
    const answer = await fetchAll(vmcgi, '/cgi-bin/echo', { method: 'POST', body: Buffer.alloc(2048) })
    expect(answer.status).toBe(413)
    expect(answer.vmcgiStatus).toBe('body-too-large')
    expect(spawned()).toBe(before)
  })

  it('answers malformed HTTP with 400 and stays healthy', async () => {
    const port = Number(new URL(vmcgi.url).port)
    const answer = await new Promise<string>((resolve) => {
      const socket = connect({ host: '127.0.0.1', port }, () => socket.write('GARBAGE \x00\x01 nonsense\r\n\r\n'))
      let text = ''
      socket.on('data', (chunk) => (text += chunk.toString()))
      socket.on('close', () => resolve(text))
      socket.on('error', () => {})
    })
    expect(answer).toMatch(/^HTTP\/1\.1 400 /)
    await expectHealthy(vmcgi)
  })
})

describe('admission', () => {
  it('answers 503 overloaded with Retry-After past limits.maxVms and the queue', async () => {
    const vmcgi = await startVmcgi({ limits: { maxVms: 1, queue: { size: 1, maxWaitMs: 1_000 } } }, testImage())
    const first = fetchAll(vmcgi, '/cgi-bin/slow?4')
    await expect.poll(vmcgi.qemuChildren).toHaveLength(1)
    const queuedTooLong = fetchAll(vmcgi, '/cgi-bin/id')
    await new Promise((resolve) => setTimeout(resolve, 100))
    const refused = await fetchAll(vmcgi, '/cgi-bin/id')
    expect(refused.status).toBe(503)
    expect(refused.vmcgiStatus).toBe('overloaded')
    expect(refused.headers['retry-after']).toBe('1')
    expect((await queuedTooLong).vmcgiStatus).toBe('overloaded')
    expect((await first).status).toBe(200)
    await expectNoVms(vmcgi)
    await vmcgi.stop()
  })
})

describe('isolation', () => {
  let vmcgi: Vmcgi
  beforeAll(async () => {
    vmcgi = await startVmcgi({}, testImage())
  })
  afterAll(() => vmcgi.stop())

  it('keeps the guest from reaching the host and vmcgi itself', async () => {
    const port = new URL(vmcgi.url).port
    for (const target of ['80', port]) {
      const answer = await fetchAll(vmcgi, `/cgi-bin/probe-host?${target}`)
      expect(answer.status).toBe(200)
      expect(answer.body).toContain('host-reachable: no')
    }
  })

  it('forwards ports on 127.0.0.1 only, and runs QEMU in its seccomp sandbox', async () => {
    const pending = fetchAll(vmcgi, '/cgi-bin/slow?3')
    await expect.poll(vmcgi.qemuChildren).toHaveLength(1)
    const [pid] = await vmcgi.qemuChildren()
    await expect.poll(() => listeningAddresses(pid!)).toHaveLength(1)
    const addresses = await listeningAddresses(pid!)
    expect(addresses.every((address) => address.startsWith('127.0.0.1:'))).toBe(true)
    const argv = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0')
    expect(argv[argv.indexOf('-sandbox') + 1]).toBe('on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny')
    expect((await pending).status).toBe(200)
  })
})

describe('shutdown and orphans', () => {
  it('drains on SIGTERM: the request in flight finishes, new ones are refused, and vmcgi exits 0', async () => {
    const vmcgi = await startVmcgi({}, testImage())
    const inFlight = fetchAll(vmcgi, '/cgi-bin/slow?2')
    await expect.poll(vmcgi.qemuChildren).toHaveLength(1)
    vmcgi.child.kill('SIGTERM')
    await expect.poll(() => vmcgi.logLines().some((line) => String(line.msg).startsWith('closing'))).toBe(true)
    await expect(request(`${vmcgi.url}/`)).rejects.toThrow()
    const answer = await inFlight
    expect(answer.status).toBe(200)
    expect(answer.body).toBe('slept 2\n')
    const result = await vmcgi.child
    expect(result.exitCode).toBe(0)
    expect(await allQemuProcesses()).toEqual([])
  })

  it('kills the VMs still serving when the drain times out, and exits 0', async () => {
    const vmcgi = await startVmcgi({ shutdown: { drainMs: 1_000 } }, testImage())
    const inFlight = fetchAll(vmcgi, '/cgi-bin/slow?30').catch(() => ({ cut: true }))
    await expect.poll(vmcgi.qemuChildren).toHaveLength(1)
    const started = Date.now()
    vmcgi.child.kill('SIGTERM')
    const result = await vmcgi.child
    expect(result.exitCode).toBe(0)
    expect(Date.now() - started).toBeLessThan(5_000)
    await inFlight
    expect(await allQemuProcesses()).toEqual([])
  })

  it('leaves no QEMU behind when vmcgi is killed with SIGKILL while VMs boot and serve', async () => {
    const vmcgi = await startVmcgi({}, testImage())
    const serving = fetchAll(vmcgi, '/cgi-bin/slow?30').catch(() => undefined)
    await expect.poll(() => vmcgi.logLines().some((line) => line.msg === 'VM state' && line.to === 'serving'), { timeout: 10_000 }).toBe(true)
    const booting = [1, 2].map(() => fetchAll(vmcgi, '/').catch(() => undefined))
    await expect.poll(vmcgi.qemuChildren).toHaveLength(3)
    const pids = await vmcgi.qemuChildren()
    vmcgi.child.kill('SIGKILL')
    await vmcgi.child
    await expect.poll(() => pids.filter((pid) => existsSync(`/proc/${pid}`)), { timeout: 2_000, interval: 50 }).toEqual([])
    await Promise.all([serving, ...booting])
  })
})

describe('preflight', () => {
  it('exits with status 2 when vm.accel asks for an accelerator that cannot work here', async () => {
    const config = writeConfig({ vm: { accel: process.platform === 'darwin' ? 'kvm' : 'hvf' } })
    const result = await execa('node', [mainJs, '--config', config], { reject: false, timeout: 30_000 })
    expect(result.exitCode).toBe(2)
    expect(result.stderr).toMatch(/^vmcgi: config: vm\.accel: /)
  })

  it('exits with status 2 when the guest does not boot', async () => {
    // A kernel given as the initrd: QEMU starts, the guest never answers.
    const image = testImage()
    const config = writeConfig({ vm: { initrd: `${image}/Image` }, readiness: { timeoutMs: 3_000 } })
    const result = await execa('node', [mainJs, '--config', config], { reject: false, timeout: 30_000 })
    expect(result.exitCode).toBe(2)
    expect(result.stderr).toMatch(/^vmcgi: config: vm: the guest did not boot/)
    expect(await allQemuProcesses()).toEqual([])
  })
})
