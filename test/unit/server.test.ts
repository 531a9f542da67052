import { describe, expect, it, onTestFinished } from 'vitest'
import pino from 'pino'
import { request } from 'undici'
import { buildServer } from '../../src/server.js'
import { fakeVmFactory, type BootBehaviour } from '../helpers/fake-vm.js'
import { fakeConfig } from '../helpers/fixtures.js'
import type { RequestListener } from 'node:http'
import { Readable } from 'node:stream'

const echoGuest: RequestListener = (req, res) => {
  const chunks: Buffer[] = []
  req.on('data', (chunk) => chunks.push(chunk))
  req.on('end', () => {
    res.setHeader('x-powered-by', 'fake-guest')
    res.setHeader('content-type', 'application/json')
    res.end(JSON.stringify({ method: req.method, url: req.url, headers: req.headers, body: Buffer.concat(chunks).toString() }))
  })
}

async function start(behaviour: BootBehaviour, guest: RequestListener = echoGuest, config = {}) {
  const { createVm, vms } = fakeVmFactory(behaviour, guest)
  const app = await buildServer(fakeConfig(config), { createVm, logger: pino({ level: 'silent' }) })
  onTestFinished(() => app.close())
  const address = await app.listen({ host: '127.0.0.1', port: 0 })
  return { address, vms, app }
}

describe('buildServer', () => {
  it('answers the health check itself, without a VM', async () => {
    const { address, vms } = await start('ok')
    const res = await request(`${address}/up`)
    expect(res.statusCode).toBe(200)
    expect(await res.body.text()).toBe('OK\n')
    expect(vms).toHaveLength(0)
  })

  it('forwards method, path, query, headers and body to a fresh VM, and stops it afterwards', async () => {
    const { address, vms } = await start('ok')
    const res = await request(`${address}/cgi-bin/echo?a=1`, {
      method: 'POST',
      headers: { 'content-type': 'text/plain', 'vmcgi-status': 'forged', 'x-custom': 'yes' },
      body: 'hello',
    })
    expect(res.statusCode).toBe(200)
    expect(res.headers['vmcgi-status']).toBe('OK')
    expect(res.headers['vmcgi-vm-boot-time']).toBe('42 ms (hardware acceleration disabled)')
    expect(res.headers['vmcgi-vm-id']).toBe(vms[0]!.id)
    expect(res.headers['x-powered-by']).toBe('fake-guest')
    expect(res.headers['server-timing']).toMatch(/^queue;dur=[\d.]+, spawn;dur=2\.0, boot;dur=40\.0, wait;dur=[\d.]+, proxy;dur=[\d.]+$/)
    const seen = (await res.body.json()) as { method: string; url: string; headers: Record<string, string>; body: string }
    expect(seen).toMatchObject({ method: 'POST', url: '/cgi-bin/echo?a=1', body: 'hello' })
    expect(seen.headers['x-custom']).toBe('yes')
    expect(seen.headers['x-forwarded-for']).toBe('127.0.0.1')
    expect(seen.headers['x-forwarded-host']).toBe(new URL(address).host)
    expect(seen.headers['vmcgi-status']).toBeUndefined()
    await vms[0]!.ended
    expect(vms[0]!.state).toBe('stopped')
  })

  it('gives every request its own VM', async () => {
    const { address, vms } = await start('ok')
    await Promise.all([1, 2, 3].map(async () => (await request(`${address}/`)).body.text()))
    expect(new Set(vms.map((vm) => vm.id)).size).toBe(3)
  })

  it('answers 502 vm-exited when QEMU dies during boot', async () => {
    const { address, vms } = await start('exit')
    const res = await request(`${address}/`)
    expect(res.statusCode).toBe(502)
    expect(res.headers['vmcgi-status']).toBe('vm-exited')
    await res.body.text()
    await vms[0]!.ended
  })

  it('passes a guest 503 back once instead of retrying it', async () => {
    let hits = 0
    const { address } = await start('ok', (_req, res) => {
      hits++
      res.statusCode = 503
      res.end('busy')
    })
    const res = await request(`${address}/`)
    expect(res.statusCode).toBe(503)
    expect(res.headers['vmcgi-status']).toBe('OK')
    await res.body.text()
    expect(hits).toBe(1)
  })

  it('answers 502 guest-unreachable when the guest drops the connection', async () => {
    const { address } = await start('ok', (req) => req.socket.destroy())
    const res = await request(`${address}/`)
    expect(res.statusCode).toBe(502)
    expect(res.headers['vmcgi-status']).toBe('guest-unreachable')
    await res.body.text()
  })

  it('answers 504 headers-timeout when the guest sends no headers in time', async () => {
    const { address } = await start('ok', () => {}, { timeouts: { headersMs: 200 } })
    const res = await request(`${address}/`)
    expect(res.statusCode).toBe(504)
    expect(res.headers['vmcgi-status']).toBe('headers-timeout')
    await res.body.text()
  })

  it('stops the VM when the client leaves during boot', async () => {
    const { address, vms } = await start('hang')
    const abort = new AbortController()
    const pending = request(`${address}/`, { signal: abort.signal }).catch((error: Error) => error)
    await expect.poll(() => vms.length).toBe(1)
    abort.abort()
    await pending
    await vms[0]!.ended
    expect(vms[0]!.state).toBe('stopped')
  })

  it('refuses a body over limits.bodyLimitBytes with 413 before any VM boots', async () => {
    const { address, vms } = await start('ok', echoGuest, { limits: { bodyLimitBytes: 10 } })
    const res = await request(`${address}/cgi-bin/echo`, { method: 'POST', body: 'x'.repeat(11) })
    expect(res.statusCode).toBe(413)
    expect(res.headers['vmcgi-status']).toBe('body-too-large')
    await res.body.text()
    expect(vms).toHaveLength(0)
  })

  it('sends a chunked body on with a Content-Length', async () => {
    const { address } = await start('ok')
    const chunks = Readable.from(['hello ', 'chunked ', 'world'])
    const res = await request(`${address}/cgi-bin/echo`, { method: 'POST', body: chunks })
    const seen = (await res.body.json()) as { headers: Record<string, string>; body: string }
    expect(seen.body).toBe('hello chunked world')
    expect(seen.headers['content-length']).toBe('19')
    expect(seen.headers['transfer-encoding']).toBeUndefined()
  })

  it('refuses a chunked body that grows past the limit with 413 before any VM boots', async () => {
    const { address, vms } = await start('ok', echoGuest, { limits: { bodyLimitBytes: 1000 } })
    const chunks = Readable.from(Array.from({ length: 10 }, () => Buffer.alloc(500, 'x')))
    const res = await request(`${address}/cgi-bin/echo`, { method: 'POST', body: chunks })
    expect(res.statusCode).toBe(413)
    expect(res.headers['vmcgi-status']).toBe('body-too-large')
    await res.body.text()
    expect(vms).toHaveLength(0)
  })

  it('answers 503 overloaded with Retry-After when VMs and queue are full', async () => {
    const { address, vms } = await start('hang', echoGuest, { limits: { maxVms: 1, queue: { size: 0 } } })
    const abort = new AbortController()
    const first = request(`${address}/`, { signal: abort.signal }).catch(() => undefined)
    await expect.poll(() => vms.length).toBe(1)
    const res = await request(`${address}/`)
    expect(res.statusCode).toBe(503)
    expect(res.headers['vmcgi-status']).toBe('overloaded')
    expect(res.headers['retry-after']).toBe('1')
    await res.body.text()
    expect(vms).toHaveLength(1)
    abort.abort()
    await first
  })

  it('answers 504 request-timeout and stops the VM when the whole request takes too long', async () => {
    const { address, vms } = await start('hang', echoGuest, { timeouts: { requestMs: 300 } })
    const res = await request(`${address}/`)
    expect(res.statusCode).toBe(504)
    expect(res.headers['vmcgi-status']).toBe('request-timeout')
    await res.body.text()
    await vms[0]!.ended
  })

  it('cuts a response whose body goes silent, and stops the VM', async () => {
    const { address, vms } = await start('ok', (_req, res) => {
      res.writeHead(200, { 'content-length': '100' })
      res.write('partial')
    }, { timeouts: { bodyIdleMs: 300 } })
    const res = await request(`${address}/`)
    expect(res.statusCode).toBe(200)
    await expect(res.body.text()).rejects.toThrow()
    await vms[0]!.ended
  })

  it('serves from a warm pool with no wait, and reports it in Server-Timing', async () => {
    let warmUps = 0
    const { address, vms, app } = await start('ok', (req, res) => {
      if (req.url === '/') warmUps++
      echoGuest(req, res)
    }, { pool: { size: 1, warmUpRequests: 2 } })
    await expect.poll(() => app.pool.ready).toBe(1)
    expect(warmUps).toBe(2)
    const res = await request(`${address}/`)
    expect(res.statusCode).toBe(200)
    expect(res.headers['vmcgi-vm-id']).toBe(vms[0]!.id)
    expect(res.headers['server-timing']).toContain('wait;dur=0.0')
    await res.body.text()
    await vms[0]!.ended
  })
})
