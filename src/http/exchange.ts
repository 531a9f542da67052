// One request's lifetime, from its first byte to its response's close: its
// deadline and the client's going as one AbortSignal with a reason, its first
// failure (the only explanation that counts), its VM lease, and its end.

import { performance } from 'node:perf_hooks'
import type { ServerResponse } from 'node:http'
import type { FastifyPluginAsync } from 'fastify'
import fp from 'fastify-plugin'
import { toVmcgiError, VmcgiError } from '../errors.js'
import type { Lease } from '../lease.js'
import { guestFailure } from '../proxy.js'

declare module 'fastify' {
  interface FastifyRequest {
    /** Null only for a request that failed before its onRequest hooks (an unparseable URL). */
    exchange: Exchange | null
  }
}

export class Exchange {
  /** When the request arrived, in performance.now() time. */
  readonly arrived = performance.now()
  /** When timeouts.requestMs runs out, in performance.now() time. */
  readonly deadline: number
  #response: ServerResponse
  #ended = new AbortController()
  #timer: NodeJS.Timeout
  #failure: VmcgiError | undefined
  #lease: Lease | undefined
  #readingBody = false
  #closed = false
  #onClosed: Array<() => void> = []

  constructor(response: ServerResponse, requestMs: number) {
    this.#response = response
    this.deadline = this.arrived + requestMs
    this.#timer = setTimeout(() => this.abort(this.#readingBody
      ? new VmcgiError('CLIENT_TIMEOUT', `the request body took over ${requestMs} ms to arrive`)
      : new VmcgiError('REQUEST_TIMEOUT', `the request took over ${requestMs} ms`)), requestMs)
    // 'close' comes for every response: complete, cut or abandoned.
    response.once('close', () => this.#close())
  }

  /** Aborted when the request runs out of time or the client goes; the reason says which. */
  get signal(): AbortSignal {
    return this.#ended.signal
  }

  /** The first failure recorded, if any. */
  get failure(): VmcgiError | undefined {
    return this.#failure
  }

  get lease(): Lease | undefined {
    return this.#lease
  }

  /** Whether the response can still get a status line of its own; if not, a failure can only cut it. */
  get answerable(): boolean {
    return !this.#response.headersSent && !this.#response.destroyed
  }

  /**
   * Records `error` as this request's failure, unless one came first, and
   * returns the one that counts. After the headers a failure can only cut
   * the response: it is cut now, before the VM dies, or a guest body that ends
   * with its connection would look complete.
   */
  fail(error: unknown): VmcgiError {
    this.#failure ??= toVmcgiError(error)
    if (this.#midBody) this.#response.destroy()
    return this.#failure
  }

  /** What went wrong while talking to the guest: the request's own reason if it has one, else what the guest did. */
  explain(error: Error & { code?: string }): VmcgiError {
    return this.fail(this.#failure ?? guestFailure(error))
  }

  /** Reads the request's body within the deadline; running out of time meanwhile is the client's fault. */
  async readBody<T>(read: (signal: AbortSignal) => Promise<T>): Promise<T> {
    this.#readingBody = true
    try {
      return await read(this.signal)
    } finally {
      this.#readingBody = false
    }
  }

  /** Takes the request's VM; it ends when the request does, or now if the request is over. */
  hold(lease: Lease): void {
    this.#lease = lease
    if (this.signal.aborted || this.#closed) {
      void lease.end()
      return
    }
    void lease.vm.exited.then(() => {
      if (this.#midBody) this.fail(new VmcgiError('VM_EXITED', 'QEMU exited while the guest answered'))
    })
  }

  /** Runs `listener` once the response has closed and its failure, if any, is recorded. */
  onClosed(listener: () => void): void {
    this.#onClosed.push(listener)
  }

  get #midBody(): boolean {
    return this.#response.headersSent && !this.#response.writableFinished && !this.#response.destroyed
  }

  /** Ends the request now: `reason` is recorded (unless a failure came first), every wait ends, and the VM goes. */
  abort(reason: VmcgiError): void {
    if (this.signal.aborted) return
    this.fail(reason)
    this.#ended.abort(reason)
    void this.#lease?.end()
  }

  #close(): void {
    if (this.#closed) return
    this.#closed = true
    clearTimeout(this.#timer)
    // vmcgi records why before it cuts a response; otherwise the client left.
    if (!this.#response.writableFinished) this.abort(new VmcgiError('CLIENT_GONE', 'the client went away'))
    void this.#lease?.end()
    for (const listener of this.#onClosed) listener()
  }
}

/** Gives every request its Exchange, before any other hook runs. */
export const exchanges = fp<{ requestMs: number }>(async (app, { requestMs }) => {
  app.decorateRequest('exchange', null)
  app.addHook('onRequest', async (request, reply) => {
    request.exchange = new Exchange(reply.raw, requestMs)
  })
}, { name: 'vmcgi-exchange' }) as FastifyPluginAsync<{ requestMs: number }>
