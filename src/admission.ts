// Admission: at most `maxVms` VMs at once. Requests over the limit wait in a
// bounded FIFO queue for at most `maxWaitMs`; past that they are refused at once
// with OVERLOADED, so vmcgi never fans out without bound.

import { VmcgiError } from './errors.js'

export interface AdmissionLimits {
  maxVms: number
  queueSize: number
  maxWaitMs: number
}

interface Waiter {
  grant: (release: () => void) => void
  refuse: (error: unknown) => void
}

export class Admission {
  #limits: AdmissionLimits
  #running = 0
  #queue: Waiter[] = []

  constructor(limits: AdmissionLimits) {
    this.#limits = limits
  }

  get running(): number {
    return this.#running
  }

  get queued(): number {
    return this.#queue.length
  }

  /**
   * Resolves with a release function once a VM may run. Release exactly once,
   * when the VM is gone. Rejects with OVERLOADED when the queue is full or the
   * wait is too long, and with the signal's reason if it aborts first.
   */
  acquire(signal: AbortSignal): Promise<() => void> {
    signal.throwIfAborted()
    if (this.#running < this.#limits.maxVms && this.#queue.length === 0) return Promise.resolve(this.#take())
    if (this.#queue.length >= this.#limits.queueSize) {
      return Promise.reject(new VmcgiError('OVERLOADED', `${this.#running} VMs running and ${this.#queue.length} requests queued`))
    }
    return new Promise((resolve, reject) => {
      const leave = () => {
        clearTimeout(timer)
        signal.removeEventListener('abort', onAbort)
        const index = this.#queue.indexOf(waiter)
        if (index !== -1) this.#queue.splice(index, 1)
      }
      const waiter: Waiter = {
        grant: (release) => {
          leave()
          resolve(release)
        },
        refuse: (error) => {
          leave()
          reject(error)
        },
      }
      const onAbort = () => waiter.refuse(signal.reason)
      const timer = setTimeout(
        () => waiter.refuse(new VmcgiError('OVERLOADED', `no VM became free within ${this.#limits.maxWaitMs} ms`)),
        this.#limits.maxWaitMs,
      )
      signal.addEventListener('abort', onAbort, { once: true })
      this.#queue.push(waiter)
    })
  }

  #take(): () => void {
    this.#running++
    let released = false
    return () => {
      if (released) return
      released = true
      this.#running--
      this.#queue[0]?.grant(this.#take())
    }
  }
}
