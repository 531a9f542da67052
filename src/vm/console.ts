// One QEMU's serial console, for one spawn attempt: its tail for the log, the guest's ready line, and lines awaited.
//
// A new QEMU after a port retry gets a new SerialConsole, so that nothing the last
// one printed (its ready line, say) counts for it.

import { performance } from 'node:perf_hooks'
import type { Readable } from 'node:stream'
import { Tail } from './tail.js'

interface Waiter {
  texts: readonly string[]
  resolve: (text: string) => void
}

export class SerialConsole {
  #tail: Tail
  #readyLine: string
  #readyMs: number | undefined
  #onReady: () => void = () => {}
  #waiters = new Set<Waiter>()
  #started = performance.now()
  /** Resolves when the guest prints its ready line; never without one configured. */
  readonly ready = new Promise<void>((resolve) => (this.#onReady = resolve))

  /** Keeps the last `tailBytes` of `output`; `readyLine` (may be empty) is the guest's "I serve now". */
  constructor(output: Readable, { tailBytes, readyLine }: { tailBytes: number; readyLine: string }) {
    this.#tail = new Tail(tailBytes)
    this.#readyLine = readyLine
    output.on('data', (chunk: Buffer) => this.#receive(chunk))
  }

  text(): string {
    return this.#tail.text()
  }

  /** When the ready line came, in ms after this console was made; for the debug log. */
  get readyMs(): number | undefined {
    return this.#readyMs
  }

  /**
   * Resolves with the first of `texts` to show on the console (or shown
   * already), or rejects with the signal's reason when it aborts first.
   */
  waitFor<T extends string>(texts: readonly T[], signal: AbortSignal): Promise<T> {
    if (signal.aborted) return Promise.reject(signal.reason)
    const seen = this.#firstOf(texts)
    if (seen !== undefined) return Promise.resolve(seen)
    return new Promise((resolve, reject) => {
      const onAbort = () => {
        this.#waiters.delete(waiter)
        reject(signal.reason)
      }
      const waiter: Waiter = {
        texts,
        resolve: (text) => {
          signal.removeEventListener('abort', onAbort)
          resolve(text as T)
        },
      }
      this.#waiters.add(waiter)
      signal.addEventListener('abort', onAbort, { once: true })
    })
  }

  #receive(chunk: Buffer): void {
    this.#tail.push(chunk)
    if (this.#readyLine && this.#readyMs === undefined && this.text().includes(this.#readyLine)) {
      this.#readyMs = Math.round(performance.now() - this.#started)
      this.#onReady()
    }
    for (const waiter of this.#waiters) {
      const seen = this.#firstOf(waiter.texts)
      if (seen === undefined) continue
      this.#waiters.delete(waiter)
      waiter.resolve(seen)
    }
  }

  /** The text among `texts` that shows earliest in the tail. */
  #firstOf<T extends string>(texts: readonly T[]): T | undefined {
    const text = this.text()
    const found = texts.map((candidate) => ({ candidate, at: text.indexOf(candidate) })).filter(({ at }) => at !== -1)
    return found.sort((a, b) => a.at - b.at)[0]?.candidate
  }
}
