import { mkdtempSync, rmSync } from 'node:fs'
import { createServer, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it, onTestFinished } from 'vitest'
import { Qmp } from '../../../src/vm/qmp.js'

/** A QMP server on a unix socket that greets, then answers each command with `reply`. */
async function fakeQmp(reply: (command: string) => object | undefined): Promise<{ path: string; closed: Promise<void> }> {
  const dir = mkdtempSync(join(tmpdir(), 'vmcgi-qmp-test-'))
  const path = join(dir, 'qmp.sock')
  let peerClosed!: () => void
  const closed = new Promise<void>((resolve) => (peerClosed = resolve))
  const server = createServer((socket: Socket) => {
    socket.setEncoding('utf8')
    socket.write(`${JSON.stringify({ QMP: { version: {} } })}\n`)
    socket.on('data', (text: string) => {
      for (const line of text.split('\n').filter(Boolean)) {
        const answer = reply((JSON.parse(line) as { execute: string }).execute)
        if (answer) socket.write(`${JSON.stringify(answer)}\n`)
      }
    })
    socket.on('close', () => peerClosed())
  })
  await new Promise<void>((resolve) => server.listen(path, resolve))
  onTestFinished(async () => {
    await new Promise<void>((resolve) => server.close(() => resolve()))
    rmSync(dir, { recursive: true, force: true })
  })
  return { path, closed }
}

describe('Qmp', () => {
  it('connects, negotiates, and rejects a command with QEMU\'s error', async () => {
    const { path } = await fakeQmp((command) =>
      command === 'qmp_capabilities' ? { return: {} } : { error: { class: 'GenericError', desc: 'no such thing' } })
    const qmp = await Qmp.connect(path, AbortSignal.timeout(5_000))
    await expect(qmp.execute('query-migrate')).rejects.toThrow('QMP: no such thing')
    await expect(qmp.execute('query-migrate')).rejects.toMatchObject({ name: 'QmpError', command: 'query-migrate', desc: 'no such thing' })
    qmp.close()
  })

  it('gives up on a QEMU that stops answering when its signal aborts, and hangs up', async () => {
    const { path, closed } = await fakeQmp((command) => (command === 'qmp_capabilities' ? { return: {} } : undefined))
    const abort = new AbortController()
    const qmp = await Qmp.connect(path, abort.signal)
    const waiting = qmp.execute('query-migrate')
    abort.abort(new Error('boot deadline'))
    await expect(waiting).rejects.toThrow('boot deadline')
    await closed
    await expect(qmp.execute('query-migrate')).rejects.toThrow('boot deadline')
  })

  it('gives up during the handshake when its signal aborts', async () => {
    const { path, closed } = await fakeQmp(() => undefined)
    const connecting = Qmp.connect(path, AbortSignal.timeout(200))
    await expect(connecting).rejects.toMatchObject({ name: 'TimeoutError' })
    await closed
  })
})
