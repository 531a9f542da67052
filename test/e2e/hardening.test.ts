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
    // requestMs leaves room for a boot on a loaded machine plus headersMs or bodyIdleMs,
    // so that each case fails for its own reason.
    vmcgi = await startVmcgi({ timeouts: { headersMs: 3_000, bodyIdleMs: 3_000, requestMs: 9_000 } }, testImage())
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
    expect(Date.now() - started).toBeLessThan(9_000 + 4_000)
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

describe('QEMU dying in the middle of an answer delimited by its connection', () => {
  let vmcgi: Vmcgi
  beforeAll(async () => {
    vmcgi = await startVmcgi({}, testImage())
  })
  afterAll(() => vmcgi.stop())

  /** Waits until the guest has answered its VM's probe and `afterMs` more, then SIGKILLs its QEMU. */
  async function killQemuAfter(afterMs: number): Promise<void> {
    await expect.poll(vmcgi.qemuChildren).toHaveLength(1)
    const [pid] = await vmcgi.qemuChildren()
    await expect.poll(() => vmcgi.logLines().some((line) => line.msg === 'VM state' && line.to === 'serving'), { timeout: 15_000 }).toBe(true)
    await new Promise((resolve) => setTimeout(resolve, afterMs))
    process.kill(pid!, 'SIGKILL')
  }

  it('cuts a body that drips, and logs and counts it as vm-exited', async () => {
    const pending = fetchAll(vmcgi, '/cgi-bin/drip?killed')
    await killQemuAfter(2_500)
    const answer = await pending
    expect(answer.status).toBe(200)
    expect(answer.cut).toBe(true)
    await expect.poll(() => vmcgi.logLines().find((line) => line.msg === 'request' && line.url === '/cgi-bin/drip?killed'))
      .toMatchObject({ complete: false, failure: 'VM_EXITED' })
    await expectNoVms(vmcgi)
    await expectHealthy(vmcgi)
  })

  it('answers 502 vm-exited, without the guest\'s cookie, when QEMU dies after the headers but before any body', async () => {
    const pending = fetchAll(vmcgi, '/cgi-bin/stall')
    await killQemuAfter(1_500)
    const answer = await pending
    expect(answer.status).toBe(502)
    expect(answer.vmcgiStatus).toBe('vm-exited')
    expect(answer.headers['set-cookie']).toBeUndefined()
    await expectNoVms(vmcgi)
  })

  it('cuts the body of a guest that powers off in the middle of it', async () => {
    const answer = await fetchAll(vmcgi, '/cgi-bin/poweroff-unframed')
    expect(answer.status).toBe(200)
    expect(answer.cut).toBe(true)
    await expectNoVms(vmcgi)
  })
})

describe('clients slow to send their bodies', () => {
  it('hold no VM: with limits.maxVms 2, two trickling bodies leave real requests served', async () => {
    const vmcgi = await startVmcgi({ limits: { maxVms: 2 }, timeouts: { clientBodyIdleMs: 3_000, clientBodyMs: 6_000 } }, testImage())
    const port = Number(new URL(vmcgi.url).port)
    const trickles = [1, 2].map(() => new Promise<string>((resolve) => {
      const socket = connect({ host: '127.0.0.1', port }, () => socket.write('POST /cgi-bin/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n'))
      let text = ''
      // One byte a second, for as long as vmcgi listens (bounded: 20 bytes at most).
      let sent = 0
      const timer = setInterval(() => (sent++ < 20 ? socket.write('x') : socket.destroy()), 1_000)
      socket.on('data', (chunk) => (text += chunk.toString()))
      socket.on('close', () => {
        clearInterval(timer)
        resolve(text)
      })
      socket.on('error', () => {})
    }))
    await new Promise((resolve) => setTimeout(resolve, 1_500))
    expect(await vmcgi.qemuChildren()).toHaveLength(0)
    const [first, second] = await Promise.all([fetchAll(vmcgi, '/cgi-bin/id'), fetchAll(vmcgi, '/cgi-bin/id')])
    expect([first.status, second.status]).toEqual([200, 200])
    // Each trickle ends at its first silence past clientBodyIdleMs, or at clientBodyMs in all.
    for (const answer of await Promise.all(trickles)) {
      expect(answer).toMatch(/^HTTP\/1\.1 408 /)
      expect(answer).toMatch(/\r\nvmcgi-status: client-timeout\r\n/)
    }
    await vmcgi.stop()
  })
})

describe('request targets the guest is the origin for', () => {
  let vmcgi: Vmcgi
  beforeAll(async () => {
    vmcgi = await startVmcgi({}, testImage())
  })
  afterAll(() => vmcgi.stop())

  it('passes a query with a stray % or a .. to the guest as it came', async () => {
    for (const query of ['discount=100%', 'next=../account']) {
      const answer = await fetchAll(vmcgi, `/cgi-bin/echo?${query}`)
      expect(answer.status).toBe(200)
      expect(answer.body).toContain(`query: ${query}\n`)
    }
  })

  it('does not let a header with underscores stand in for X-Forwarded-For', async () => {
    const answer = await fetchAll(vmcgi, '/cgi-bin/echo', { headers: { 'x_forwarded_for': '6.6.6.6' } })
    expect(answer.status).toBe(200)
    expect(answer.body).not.toContain('6.6.6.6')
    expect(answer.body).toContain('header: HTTP_X_FORWARDED_FOR=127.0.0.1\n')
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

  it('exits with status 2 naming listen.host when it is not a host', async () => {
    const config = writeConfig({ listen: { host: 'not a host' }, preflight: { boot: false } })
    const result = await execa('node', [mainJs, '--config', config], { reject: false, timeout: 30_000 })
    expect(result.exitCode).toBe(2)
    expect(result.stderr).toMatch(/^vmcgi: config: listen\.host: /)
  })

  it('exits with status 2 and QEMU\'s own reason when QEMU refuses the machine', async () => {
    const config = writeConfig({ vm: { cpus: 64 } })
    const result = await execa('node', [mainJs, '--config', config], { reject: false, timeout: 30_000 })
    expect(result.exitCode).toBe(2)
    expect(result.stderr).toMatch(/^vmcgi: config: vm: the guest did not boot: QEMU exited \(status 1\): qemu-system-aarch64: .*CPU/i)
    expect(await allQemuProcesses()).toEqual([])
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
