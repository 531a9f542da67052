// vmcgi end to end: the real CLI, real QEMU, the real default guest.

import { randomBytes } from 'node:crypto'
import { execa } from 'execa'
import { request } from 'undici'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { allQemuProcesses, bootTime, expectGuestPage, expectNoVms, mainJs, startVmcgi, writeConfig, type Vmcgi } from './harness.js'


describe('one fresh VM per request', () => {
  let vmcgi: Vmcgi
  beforeAll(async () => {
    vmcgi = await startVmcgi()
  })
  afterAll(async () => {
    await vmcgi.stop()
    expect(await allQemuProcesses()).toEqual([])
  })

  it('serves the guest page with vmcgi headers, then kills the VM', async () => {
    await expectGuestPage(vmcgi)
  })

  it('answers HEAD with the headers only', async () => {
    const res = await request(`${vmcgi.url}/`, { method: 'HEAD' })
    expect(res.statusCode).toBe(200)
    expect(res.headers['vmcgi-status']).toBe('OK')
    expect(res.headers['vmcgi-vm-boot-time']).toMatch(bootTime)
    expect(await res.body.text()).toBe('')
    await expectNoVms(vmcgi)
  })

  it('round-trips a 1 MiB POST body byte for byte through a CGI script', async () => {
    const body = randomBytes(1024 * 1024)
    const res = await request(`${vmcgi.url}/cgi-bin/echo?x=1`, {
      method: 'POST',
      headers: { 'content-type': 'application/octet-stream', 'x-test': 'round-trip' },
      body,
    })
    expect(res.statusCode).toBe(200)
    expect(res.headers['vmcgi-status']).toBe('OK')
    const answer = Buffer.from(await res.body.arrayBuffer())
    const marker = answer.indexOf('body:\n')
    const preamble = answer.subarray(0, marker).toString()
    expect(preamble).toContain('method: POST')
    expect(preamble).toContain('query: x=1')
    expect(preamble).toContain('header: HTTP_X_TEST=round-trip')
    expect(preamble).toContain('header: HTTP_X_FORWARDED_FOR=127.0.0.1')
    const echoed = answer.subarray(marker + 'body:\n'.length)
    expect(echoed.length).toBe(body.length)
    expect(echoed.equals(body)).toBe(true)
    await expectNoVms(vmcgi)
  })

  it('gives three concurrent requests three different VMs', async () => {
    const answers = await Promise.all([1, 2, 3].map(async () => {
      const res = await request(`${vmcgi.url}/cgi-bin/id`)
      expect(res.statusCode).toBe(200)
      return { vm: res.headers['vmcgi-vm-id'], text: await res.body.text() }
    }))
    const ids = answers.map(({ text }) => /^id: ([0-9a-f]{32})$/m.exec(text)?.[1])
    expect(ids.every(Boolean)).toBe(true)
    expect(new Set(ids).size).toBe(3)
    expect(new Set(answers.map(({ vm }) => vm)).size).toBe(3)
    await expectNoVms(vmcgi)
  })

  it('writes one log line per request with the VM and its boot time', async () => {
    const res = await request(`${vmcgi.url}/?log-check`)
    const vmId = res.headers['vmcgi-vm-id']
    await res.body.text()
    await expect.poll(() => vmcgi.logLines().find((line) => line.msg === 'request' && line.vm === vmId)).toBeTruthy()
    const line = vmcgi.logLines().find((entry) => entry.msg === 'request' && entry.vm === vmId)!
    expect(line).toMatchObject({ statusCode: 200, vmcgiStatus: 'OK', url: '/?log-check' })
    expect(line.bootMs).toBeGreaterThan(0)
    expect(line.reqId).toBeTruthy()
  })

  it('answers its health check without booting a VM', async () => {
    const res = await request(`${vmcgi.url}/up`)
    expect(res.statusCode).toBe(200)
    await res.body.text()
    expect(await vmcgi.qemuChildren()).toEqual([])
  })
})

describe('a guest that never answers', () => {
  it('gets 504 boot-timeout within the boot timeout, and its VM is killed', async () => {
    const timeoutMs = 3_000
    // Without the preflight boot, which would refuse to start on such a guest.
    const vmcgi = await startVmcgi({ vm: { guestPort: 8081 }, readiness: { timeoutMs }, preflight: { boot: false } })
    const started = Date.now()
    const res = await request(`${vmcgi.url}/`)
    const elapsed = Date.now() - started
    expect(res.statusCode).toBe(504)
    expect(res.headers['vmcgi-status']).toBe('boot-timeout')
    await res.body.text()
    expect(elapsed).toBeGreaterThanOrEqual(timeoutMs - 50)
    expect(elapsed).toBeLessThan(timeoutMs + 3_000)
    await expectNoVms(vmcgi)
    // The guest's console tail is in the log of the failed boot.
    const failure = vmcgi.logLines().find((line) => line.msg === 'VM failed to boot')
    expect(String(failure?.console)).toContain('vmcgi: ready')
    await vmcgi.stop()
  })
})

describe('configuration errors', () => {
  it('exits with status 2 and names vm.kernel when the kernel file is missing', async () => {
    const config = writeConfig({ vm: { kernel: '/nonexistent/Image' } })
    const result = await execa('node', [mainJs, '--config', config], { reject: false, timeout: 20_000 })
    expect(result.exitCode).toBe(2)
    expect(result.stderr).toMatch(/^vmcgi: config: vm\.kernel: file not found: \/nonexistent\/Image$/)
  })

  it('exits with status 2 and names the field for an unknown key', async () => {
    const config = writeConfig({ vm: { memory: 128 } })
    const result = await execa('node', [mainJs, '--config', config], { reject: false, timeout: 20_000 })
    expect(result.exitCode).toBe(2)
    expect(result.stderr.trim()).toBe('vmcgi: config: vm.memory: unknown key')
  })

  it('exits with status 2 without a --config', async () => {
    const result = await execa('node', [mainJs], { reject: false, timeout: 20_000 })
    expect(result.exitCode).toBe(2)
    expect(result.stderr).toContain('--config')
  })
})
