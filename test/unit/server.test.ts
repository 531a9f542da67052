import { describe, expect, it, onTestFinished } from 'vitest'
import pino from 'pino'
import { request } from 'undici'
import { Metrics } from '../../src/metrics.js'
import { buildServer } from '../../src/server.js'
import { fakeVmFactory, type BootBehaviour } from '../helpers/fake-vm.js'
import { fakeConfig } from '../helpers/fixtures.js'
import type { RequestListener } from 'node:http'
import { createServer } from 'node:http'
import { connect, type AddressInfo, type Socket } from 'node:net'
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

/** Writes `text` on a fresh connection and returns everything read until the server closes it or 5 s pass. */
function rawExchange(address: string, text: string): Promise<string> {
  const { hostname, port } = new URL(address)
  return new Promise((resolve, reject) => {
    const socket = connect({ host: hostname, port: Number(port) }, () => socket.write(text))
    let answer = ''
    socket.setEncoding('latin1')
    socket.setTimeout(5_000, () => socket.end())
    socket.on('data', (chunk: string) => (answer += chunk))
    socket.on('error', reject)
    socket.on('close', () => resolve(answer))
  })
}

async function start(behaviour: BootBehaviour, guest: RequestListener = echoGuest, config = {}, metrics = new Metrics()) {
  const { createVm, vms } = fakeVmFactory(behaviour, guest)
  const app = await buildServer(fakeConfig(config), { createVm, logger: pino({ level: 'silent' }), metrics })
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

  it('tries a bodiless request again when the guest resets it before answering, as a one-socket stack does while busy', async () => {
    let connections = 0
    const { address } = await start('ok', (req, res) => {
      if (++connections <= 2) return void req.socket.destroy()
      echoGuest(req, res)
    })
    const res = await request(`${address}/again`)
    expect(res.statusCode).toBe(200)
    expect(res.headers['vmcgi-status']).toBe('OK')
    expect(await res.body.json()).toMatchObject({ url: '/again' })
    expect(connections).toBe(3)
  })

  it('does not send a request with a body again after a reset', async () => {
    let connections = 0
    const { address } = await start('ok', (req) => {
      connections++
      req.socket.destroy()
    })
    const res = await request(`${address}/cgi-bin/echo`, { method: 'POST', body: 'once' })
    expect(res.statusCode).toBe(502)
    expect(res.headers['vmcgi-status']).toBe('guest-unreachable')
    await res.body.text()
    expect(connections).toBe(1)
  })

  it('answers 502 guest-unreachable when the guest drops the connection', async () => {
    const { address } = await start('ok', (req) => req.socket.destroy())
    const res = await request(`${address}/`)
    expect(res.statusCode).toBe(502)
    expect(res.headers['vmcgi-status']).toBe('guest-unreachable')
    await res.body.text()
  })

  it('answers 502 vm-exited, not guest-unreachable, when QEMU dies before the guest answers', async () => {
    let dies = () => {}
    const { address, vms } = await start('ok', () => dies())
    dies = () => {
      vms[0]!.reapDelayMs = 500
      void vms[0]!.destroy(new Error('QEMU was killed'))
    }
    const res = await request(`${address}/`)
    expect(res.statusCode).toBe(502)
    expect(res.headers['vmcgi-status']).toBe('vm-exited')
    await res.body.text()
  })

  it('answers 504 headers-timeout when the guest sends no headers in time', async () => {
    const { address } = await start('ok', () => {}, { timeouts: { headersMs: 200 } })
    const res = await request(`${address}/`)
    expect(res.statusCode).toBe(504)
    expect(res.headers['vmcgi-status']).toBe('headers-timeout')
    await res.body.text()
  })

  it('stops the VM when the client leaves during boot, and counts it as client-gone', async () => {
    const metrics = new Metrics()
    const { address, vms } = await start('hang', echoGuest, {}, metrics)
    const abort = new AbortController()
    const pending = request(`${address}/`, { signal: abort.signal }).catch((error: Error) => error)
    await expect.poll(() => vms.length).toBe(1)
    abort.abort()
    await pending
    await vms[0]!.ended
    expect(vms[0]!.state).toBe('stopped')
    await expect.poll(() => metrics.registry.metrics()).toMatch(/vmcgi_requests_total\{vmcgi_status="client-gone",code="499"\} 1/)
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

  it('sends a chunked body larger than limits.bodyBufferBytes on whole, from a file', async () => {
    const { address } = await start('ok', echoGuest, { limits: { bodyBufferBytes: 1024 } })
    const parts = Array.from({ length: 40 }, (_, i) => Buffer.alloc(5_000, 97 + (i % 26)))
    const res = await request(`${address}/cgi-bin/echo`, { method: 'POST', body: Readable.from(parts) })
    const seen = (await res.body.json()) as { headers: Record<string, string>; body: string }
    expect(seen.headers['content-length']).toBe('200000')
    expect(seen.body).toBe(Buffer.concat(parts).toString())
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

  it('answers 408 client-timeout when a chunked body does not arrive within timeouts.requestMs', async () => {
    const { address, vms } = await start('ok', echoGuest, { timeouts: { requestMs: 300 } })
    const answer = await rawExchange(address, 'POST /cgi-bin/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n')
    expect(answer).toMatch(/^HTTP\/1\.1 408 /)
    expect(answer).toMatch(/\r\nvmcgi-status: client-timeout\r\n/)
    expect(vms).toHaveLength(0)
  })

  it('answers 503 overloaded to a chunked body beyond maxVms + queue.size being read at once', async () => {
    const { address, vms } = await start('ok', echoGuest, { limits: { maxVms: 1, queue: { size: 1 } } })
    const { hostname, port } = new URL(address)
    // Two bodies that never end, being read.
    const holding = [1, 2].map(() => connect({ host: hostname, port: Number(port) }, function (this: Socket) {
      this.write('POST /cgi-bin/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n')
    }).on('error', () => {}))
    onTestFinished(() => holding.forEach((socket) => socket.destroy()))
    await new Promise((resolve) => setTimeout(resolve, 200))
    const third = await rawExchange(address, 'POST /cgi-bin/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n')
    expect(third).toMatch(/^HTTP\/1\.1 503 /)
    expect(third).toMatch(/\r\nvmcgi-status: overloaded\r\n/)
    expect(third).toMatch(/\r\nconnection: close\r\n/i)
    expect(vms).toHaveLength(0)
  })

  it('reads a small body before taking a VM, so that a slow client holds none', async () => {
    const { address, vms } = await start('ok', echoGuest, { limits: { maxVms: 1 } })
    const { hostname, port } = new URL(address)
    const slow = connect({ host: hostname, port: Number(port) }, () => {
      slow.write('POST /cgi-bin/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nh')
    }).on('error', () => {})
    onTestFinished(() => void slow.destroy())
    await new Promise((resolve) => setTimeout(resolve, 200))
    const res = await request(`${address}/`)
    expect(res.statusCode).toBe(200)
    await res.body.text()
    expect(vms).toHaveLength(1)
    const answer = new Promise<string>((resolve) => {
      let text = ''
      slow.setEncoding('latin1').on('data', (chunk: string) => {
        text += chunk
        if (text.includes('"body"')) resolve(text)
      })
    })
    slow.write('ello')
    expect(await answer).toMatch(/"body":"hello"/)
    expect(vms).toHaveLength(2)
  })

  it('answers 408 client-timeout, without a VM, to a small body that goes silent', async () => {
    const { address, vms } = await start('ok', echoGuest, { timeouts: { clientBodyIdleMs: 300 } })
    const answer = await rawExchange(address, 'POST /cgi-bin/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhe')
    expect(answer).toMatch(/^HTTP\/1\.1 408 /)
    expect(answer).toMatch(/\r\nvmcgi-status: client-timeout\r\n/)
    expect(vms).toHaveLength(0)
  })

  it('ends a request whose large, streamed body goes silent as client-timeout, and stops its VM', async () => {
    const metrics = new Metrics()
    const { address, vms } = await start('ok', echoGuest, { limits: { bodyBufferBytes: 4 }, timeouts: { clientBodyIdleMs: 300 } }, metrics)
    const answer = await rawExchange(address, 'POST /cgi-bin/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\nhello')
    expect(answer).toMatch(/^HTTP\/1\.1 408 /)
    expect(answer).toMatch(/\r\nvmcgi-status: client-timeout\r\n/)
    expect(vms).toHaveLength(1)
    await vms[0]!.ended
    await expect.poll(() => metrics.registry.metrics()).toMatch(/vmcgi_requests_total\{vmcgi_status="client-timeout",code="408"\} 1/)
  })

  it('answers Expect: 100-continue with 413 instead of 100 when the body is over the limit', async () => {
    const { address, vms } = await start('ok', echoGuest, { limits: { bodyLimitBytes: 10 } })
    const answer = await rawExchange(address, 'POST /cgi-bin/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n')
    expect(answer).toMatch(/^HTTP\/1\.1 413 /)
    expect(vms).toHaveLength(0)
    const within = await rawExchange(address, 'POST /cgi-bin/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n')
    expect(within).toMatch(/^HTTP\/1\.1 100 Continue\r\n/)
  })

  it('answers 501 not-implemented to a transfer coding other than chunked', async () => {
    const { address, vms } = await start('ok')
    const answer = await rawExchange(address, 'POST /cgi-bin/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n')
    expect(answer).toMatch(/^HTTP\/1\.1 501 /)
    expect(answer).toMatch(/\r\nvmcgi-status: not-implemented\r\n/)
    expect(vms).toHaveLength(0)
  })

  it('forwards methods beyond the usual ones, such as WebDAV\'s PROPFIND', async () => {
    const { address } = await start('ok')
    const res = await request(`${address}/dav/`, { method: 'PROPFIND', body: '<propfind/>', headers: { depth: '1' } })
    expect(res.statusCode).toBe(200)
    expect(res.headers['vmcgi-status']).toBe('OK')
    expect(await res.body.json()).toMatchObject({ method: 'PROPFIND', url: '/dav/', body: '<propfind/>' })
  })

  it('answers 400 bad-request, without a VM, to what it cannot parse, and opens no tunnel', async () => {
    const { address, vms } = await start('ok')
    const garbage = await rawExchange(address, 'NOT HTTP AT ALL\r\n\r\n')
    expect(garbage).toMatch(/^HTTP\/1\.1 400 /)
    expect(garbage).toMatch(/\r\nvmcgi-status: bad-request\r\n/)
    const tunnel = await rawExchange(address, 'CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n')
    // Node hangs up on CONNECT when nothing listens for tunnels: no tunnel, no VM.
    expect(tunnel).not.toMatch(/^HTTP\/1\.1 2/)
    expect(vms).toHaveLength(0)
  })

  it('sends a request in absolute form to the VM, never to the host it names', async () => {
    let elsewhere = 0
    const other = createServer((_req, res) => res.end(String(++elsewhere)))
    await new Promise<void>((resolve) => other.listen(0, '127.0.0.1', resolve))
    onTestFinished(() => new Promise<void>((resolve) => other.close(() => resolve())))
    const target = `http://127.0.0.1:${(other.address() as AddressInfo).port}/secret`
    const { address } = await start('ok')
    const answer = await rawExchange(address, `GET ${target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
    expect(elsewhere).toBe(0)
    expect(answer).toMatch(/\r\nvmcgi-status: /)
  })

  it('sends a path that starts with // to the VM as a path, never to the host it seems to name', async () => {
    let elsewhere = 0
    const other = createServer((_req, res) => res.end(String(++elsewhere)))
    await new Promise<void>((resolve) => other.listen(0, '127.0.0.1', resolve))
    onTestFinished(() => new Promise<void>((resolve) => other.close(() => resolve())))
    const { address } = await start('ok')
    const res = await request(`${address}//127.0.0.1:${(other.address() as AddressInfo).port}/secret?x=1`)
    expect(elsewhere).toBe(0)
    expect(res.statusCode).toBe(200)
    expect(res.headers['vmcgi-status']).toBe('OK')
    expect(await res.body.json()).toMatchObject({ url: `//127.0.0.1:${(other.address() as AddressInfo).port}/secret?x=1` })
  })

  it('forwards a request in absolute form by its path and query, and a query with a stray % or .. as it came', async () => {
    const { address, vms } = await start('ok')
    const absolute = await rawExchange(address, 'GET http://evil.example/x?a=1 HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n')
    expect(absolute).toMatch(/^HTTP\/1\.1 200 /)
    expect(absolute).toContain('"url":"/x?a=1"')
    for (const query of ['discount=100%', 'next=../account']) {
      const res = await request(`${address}/shop?${query}`)
      expect(res.statusCode).toBe(200)
      expect(((await res.body.json()) as { url: string }).url).toBe(`/shop?${query}`)
    }
    expect(vms).toHaveLength(3)
  })

  it('refuses a path it cannot forward as it came with 400 bad-request, before any VM boots', async () => {
    const { address, vms } = await start('ok')
    for (const path of ['/a/../etc/passwd', '/%ZZ', '/%2e%2e/x']) {
      const answer = await rawExchange(address, `GET ${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
      expect(answer, path).toMatch(/^HTTP\/1\.1 400 /)
      expect(answer, path).toMatch(/\r\nvmcgi-status: bad-request\r\n/)
    }
    expect(vms).toHaveLength(0)
  })

  it('answers 400 bad-request, before any VM boots, to two Hosts, a Host that is not one, or HTTP/1.1 without one', async () => {
    const { address, vms } = await start('ok')
    for (const head of ['Host: a.example\r\nHost: b.example', 'Host: a b/c', '']) {
      const answer = await rawExchange(address, `GET / HTTP/1.1\r\n${head ? `${head}\r\n` : ''}Connection: close\r\n\r\n`)
      expect(answer, head).toMatch(/^HTTP\/1\.1 400 /)
      expect(answer, head).toMatch(/\r\nvmcgi-status: bad-request\r\n/)
    }
    expect(vms).toHaveLength(0)
    const old = await rawExchange(address, 'GET / HTTP/1.0\r\n\r\n')
    expect(old).toMatch(/^HTTP\/1\.1 200 /)
  })

  it('answers CONNECT with 405 and a vmcgi-status, and opens no tunnel', async () => {
    const { address, vms } = await start('ok')
    const tunnel = await rawExchange(address, 'CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n')
    expect(tunnel).toMatch(/^HTTP\/1\.1 405 /)
    expect(tunnel).toMatch(/\r\nvmcgi-status: bad-request\r\n/)
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

  it('cuts a response whose body goes silent, stops the VM, and counts it as body-timeout', async () => {
    const metrics = new Metrics()
    const { address, vms } = await start('ok', (_req, res) => {
      res.writeHead(200, { 'content-length': '100' })
      res.write('partial')
    }, { timeouts: { bodyIdleMs: 300 } }, metrics)
    const res = await request(`${address}/`)
    expect(res.statusCode).toBe(200)
    await expect(res.body.text()).rejects.toThrow()
    await vms[0]!.ended
    await expect.poll(() => metrics.registry.metrics()).toMatch(/vmcgi_requests_total\{vmcgi_status="body-timeout",code="200"\} 1/)
  })

  it('cuts a body delimited by the connection\'s close when QEMU died, instead of ending it cleanly', async () => {
    const metrics = new Metrics()
    let dies = () => {}
    const { address, vms } = await start('ok', (req) => {
      req.socket.write('HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\npartial')
      setTimeout(() => dies(), 100)
    }, {}, metrics)
    dies = () => {
      vms[0]!.reapDelayMs = 500
      void vms[0]!.destroy(new Error('QEMU was killed'))
    }
    const res = await request(`${address}/`)
    expect(res.statusCode).toBe(200)
    await expect(res.body.text()).rejects.toThrow()
    await expect.poll(() => metrics.registry.metrics()).toMatch(/vmcgi_requests_total\{vmcgi_status="vm-exited",code="200"\} 1/)
  })

  it('ends a body delimited by the connection\'s close cleanly when the guest closed it and QEMU runs', async () => {
    const { address } = await start('ok', (req) => {
      req.socket.end('HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nwhole body')
    })
    const res = await request(`${address}/`)
    expect(res.statusCode).toBe(200)
    expect(await res.body.text()).toBe('whole body')
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
