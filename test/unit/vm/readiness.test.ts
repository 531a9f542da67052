import { createServer as createHttpServer } from 'node:http'
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net'
import { describe, expect, it, onTestFinished } from 'vitest'
import { execa } from 'execa'
import { findListener, stillHolds, waitUntilReady, type Listener } from '../../../src/vm/readiness.js'

async function listen(server: Server): Promise<number> {
  onTestFinished(() => new Promise<void>((resolve) => server.close(() => resolve())))
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  return (server.address() as AddressInfo).port
}

const options = { host: '127.0.0.1', path: '/', intervalMs: 10, attemptTimeoutMs: 100 }

describe('waitUntilReady', () => {
  it('resolves at the first HTTP answer, whatever its status', async () => {
    const port = await listen(createHttpServer((_req, res) => res.writeHead(404).end()))
    await expect(waitUntilReady({ ...options, port, signal: AbortSignal.timeout(5_000) })).resolves.toBeUndefined()
  })

  it('does not take an accepted-then-closed connection for readiness', async () => {
    // What QEMU's user networking does before the guest listens.
    const port = await listen(createServer((socket) => socket.destroy()))
    const started = Date.now()
    await expect(waitUntilReady({ ...options, port, signal: AbortSignal.timeout(400) })).rejects.toMatchObject({ name: 'TimeoutError' })
    expect(Date.now() - started).toBeGreaterThanOrEqual(350)
  })

  it('does not take garbage for an HTTP answer', async () => {
    const port = await listen(createServer((socket) => socket.resume().end('hello\r\n')))
    await expect(waitUntilReady({ ...options, port, signal: AbortSignal.timeout(300) })).rejects.toMatchObject({ name: 'TimeoutError' })
  })

  it('probes at once when the console says the guest is ready', async () => {
    // The first probe is dropped, as before the guest listens; with a one-minute
    // interval only the console's nudge can start the probe that succeeds.
    const answer = createHttpServer((_req, res) => res.end('ok'))
    let connections = 0
    const port = await listen(createServer((socket) => {
      if (++connections === 1) socket.destroy()
      else answer.emit('connection', socket)
    }))
    let consoleSaysReady!: () => void
    const consoleReady = new Promise<void>((resolve) => (consoleSaysReady = resolve))
    const waiting = waitUntilReady({ ...options, port, intervalMs: 60_000, signal: AbortSignal.timeout(5_000), consoleReady })
    await expect.poll(() => connections).toBe(1)
    consoleSaysReady()
    await expect(waiting).resolves.toBeUndefined()
    expect(connections).toBe(2)
  })

  it('waits as long as it takes for the answer of the probe the console line starts', async () => {
    // A guest that listens but answers slower than attemptTimeoutMs (a busy
    // host): short probes alone would give up on every answer.
    const port = await listen(createHttpServer((_req, res) => setTimeout(() => res.end('ok'), 400)))
    const waiting = waitUntilReady({ ...options, port, intervalMs: 60_000, signal: AbortSignal.timeout(5_000), consoleReady: Promise.resolve() })
    await expect(waiting).resolves.toBeUndefined()
  })

  it('sends another probe when the one the console line starts stays unanswered', async () => {
    // What a SYN that slirp dropped looks like from the host: a connection
    // that is open and never answered. slirp would send it again only after
    // seconds; a second probe gets through at once.
    const answer = createHttpServer((_req, res) => res.end('ok'))
    const held: Socket[] = []
    let connections = 0
    const port = await listen(createServer((socket) => {
      if (++connections === 1) held.push(socket.resume())
      else answer.emit('connection', socket)
    }))
    onTestFinished(() => held.forEach((socket) => socket.destroy()))
    const started = Date.now()
    const waiting = waitUntilReady({ ...options, port, intervalMs: 60_000, signal: AbortSignal.timeout(5_000), consoleReady: Promise.resolve() })
    await expect(waiting).resolves.toBeUndefined()
    expect(connections).toBe(2)
    expect(Date.now() - started).toBeLessThan(4_000)
    // The unanswered probe is closed once another was answered.
    await expect.poll(() => held[0]!.destroyed || held[0]!.readableEnded).toBe(true)
  })

  it('gives later probes longer to answer when there is no console line', async () => {
    const port = await listen(createHttpServer((_req, res) => setTimeout(() => res.end('ok'), 300)))
    const started = Date.now()
    await expect(waitUntilReady({ ...options, port, signal: AbortSignal.timeout(5_000) })).resolves.toBeUndefined()
    // Probes live max(100 ms, half the wait so far): none lasts 300 ms before about 600 ms.
    expect(Date.now() - started).toBeGreaterThanOrEqual(500)
  })

  it('rejects with the reason of its signal', async () => {
    const port = await listen(createServer((socket) => socket.resume()))
    const abort = new AbortController()
    const waiting = waitUntilReady({ ...options, port, signal: abort.signal })
    abort.abort(new Error('client gone'))
    await expect(waiting).rejects.toThrow('client gone')
  })
})

describe('findListener', () => {
  it('tells whether a process listens on a port of 127.0.0.1', async () => {
    const port = await listen(createServer())
    expect(findListener(process.pid, port)).toMatchObject({ target: expect.stringMatching(/^socket:\[\d+\]$/) })

    // Another process's listener on another port is not this process's.
    const other = execa('node', ['-e', `require('net').createServer().listen(0, '127.0.0.1', function () { console.log(this.address().port) })`], { reject: false })
    onTestFinished(() => void other.kill())
    const otherPort = await new Promise<number>((resolve) => other.stdout!.once('data', (chunk: Buffer) => resolve(Number(chunk.toString().trim()))))
    expect(findListener(process.pid, otherPort)).toBe(false)
    expect(findListener(other.pid!, otherPort)).toMatchObject({ target: expect.stringMatching(/^socket:\[\d+\]$/) })
    expect(findListener(other.pid!, port)).toBe(false)
  })

  it('cannot tell for a process that does not exist', () => {
    expect(findListener(2 ** 22 + 1, 80)).toBeUndefined()
  })
})

describe('findListener and stillHolds', () => {
  it('finds the descriptor that listens, and sees it go when the listener closes', async () => {
    const server = createServer()
    const port = await listen(server)
    const listener = findListener(process.pid, port)
    expect(listener).toMatchObject({ pid: process.pid, target: expect.stringMatching(/^socket:\[\d+\]$/) })
    expect(stillHolds(listener as Listener)).toBe(true)
    await new Promise((resolve) => server.close(resolve))
    expect(stillHolds(listener as Listener)).toBe(false)
    expect(findListener(process.pid, port)).toBe(false)
  })
})
