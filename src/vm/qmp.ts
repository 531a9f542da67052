// A minimal client for the QEMU Machine Protocol: JSON lines over a unix
// socket. Enough to pause, snapshot and restore a VM.
//
// QEMU's refusals are QmpErrors, not failures of the catalogue: what one means
// for a request (a clone that could not be restored, say) is the caller's to say.

import { connect, type Socket } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { VmcgiError } from '../errors.js'

/** QEMU refused a command, or a migration it ran failed; QEMU itself runs on. */
export class QmpError extends Error {
  readonly command: string
  /** QEMU's own words. */
  readonly desc: string

  constructor(command: string, desc: string) {
    super(`QMP: ${desc}`)
    this.name = 'QmpError'
    this.command = command
    this.desc = desc
  }
}

interface Pending {
  command: string
  resolve: (value: unknown) => void
  reject: (error: Error) => void
}

export class Qmp {
  #socket: Socket
  #pending: Pending[] = []
  #buffer = ''
  #closed = false

  #signal: AbortSignal
  #onAbort = () => this.#fail(this.#signal.reason as Error)

  /** Every wait on this connection ends when `signal` aborts, with its reason. */
  private constructor(socket: Socket, signal: AbortSignal) {
    this.#socket = socket
    this.#signal = signal
    socket.setEncoding('utf8')
    socket.on('data', (text: string) => this.#receive(text))
    socket.on('error', () => {})
    socket.on('close', () => this.#fail(new VmcgiError('VM_EXITED', 'QMP connection closed')))
    signal.addEventListener('abort', this.#onAbort, { once: true })
  }

  /** Connects once QEMU has made its socket, then leaves capabilities negotiation. */
  static async connect(path: string, signal: AbortSignal): Promise<Qmp> {
    for (;;) {
      signal.throwIfAborted()
      const socket = await new Promise<Socket | undefined>((resolve) => {
        const attempt = connect(path)
        attempt.once('connect', () => resolve(attempt))
        attempt.once('error', () => resolve(undefined))
      })
      if (socket) {
        const qmp = new Qmp(socket, signal)
        try {
          // The greeting comes first, unasked; it is the answer to nothing.
          await qmp.#next('(greeting)')
          await qmp.execute('qmp_capabilities')
        } catch (error) {
          qmp.close()
          throw error
        }
        return qmp
      }
      await sleep(2, undefined, { signal }).catch(() => {})
    }
  }

  /** Runs one command; rejects with a QmpError when QEMU refuses it. */
  async execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    const answer = this.#next(command)
    this.#socket.write(`${JSON.stringify(args ? { execute: command, arguments: args } : { execute: command })}\n`)
    return answer
  }

  close(): void {
    this.#signal.removeEventListener('abort', this.#onAbort)
    this.#socket.destroy()
  }

  /** Rejects every waiting command and closes the connection. */
  #fail(error: Error): void {
    this.#closed = true
    this.#signal.removeEventListener('abort', this.#onAbort)
    this.#socket.destroy()
    for (const pending of this.#pending.splice(0)) pending.reject(error)
  }

  #next(command: string): Promise<unknown> {
    if (this.#signal.aborted) return Promise.reject(this.#signal.reason)
    if (this.#closed) return Promise.reject(new VmcgiError('VM_EXITED', 'QMP connection closed'))
    return new Promise((resolve, reject) => this.#pending.push({ command, resolve, reject }))
  }

  #receive(text: string): void {
    this.#buffer += text
    let newline
    while ((newline = this.#buffer.indexOf('\n')) !== -1) {
      const line = this.#buffer.slice(0, newline).trim()
      this.#buffer = this.#buffer.slice(newline + 1)
      if (!line) continue
      const message = JSON.parse(line) as { QMP?: unknown; return?: unknown; error?: { desc: string }; event?: string }
      if (message.event) continue
      const pending = this.#pending.shift()
      if (!pending) continue
      if (message.error) pending.reject(new QmpError(pending.command, message.error.desc))
      else pending.resolve(message.QMP ?? message.return)
    }
  }
}

/** Polls query-migrate until the migration has completed; rejects with a QmpError if it failed. */
export async function waitForMigration(qmp: Qmp, signal: AbortSignal): Promise<void> {
  for (;;) {
    const { status, 'error-desc': error } = (await qmp.execute('query-migrate')) as { status?: string; 'error-desc'?: string }
    if (status === 'completed') return
    if (status === 'failed' || status === 'cancelled') {
      throw new QmpError('query-migrate', `migration ${status}${error ? `: ${error}` : ''}`)
    }
    // The signal's own reason (a boot timeout, say), not the timer's AbortError.
    await sleep(2, undefined, { signal }).catch(() => signal.throwIfAborted())
  }
}
