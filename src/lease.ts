// A request's claim on a VM: an admission slot and the VM that runs in it,
// taken together and given back in order (the VM closed, then the slot freed),
// so that limits.maxVms counts every QEMU process until it is reaped.

import { performance } from 'node:perf_hooks'
import type { FastifyBaseLogger } from 'fastify'
import type { Admission } from './admission.js'
import type { VmPool } from './pool.js'
import type { GuestVm } from './vm/guest.js'

export class Lease {
  readonly vm: GuestVm
  /** How long the request waited for its admission slot. */
  readonly queueMs: number
  /** How long it then waited for its VM: 0 when a warm one was ready. */
  readonly waitMs: number
  #release: () => void
  #ended: Promise<void> | undefined

  constructor(vm: GuestVm, timing: { queueMs: number; waitMs: number }, release: () => void) {
    this.vm = vm
    this.queueMs = timing.queueMs
    this.waitMs = timing.waitMs
    this.#release = release
  }

  get ended(): boolean {
    return this.#ended !== undefined
  }

  /**
   * Closes the VM (gracefully, or at once when given a reason), then frees the
   * slot. Idempotent; a reason given later still hurries a graceful close.
   */
  end(reason?: Error): Promise<void> {
    const stopping = reason ? this.vm.destroy(reason) : this.vm.close()
    this.#ended ??= stopping.finally(this.#release)
    return this.#ended
  }
}

/** Hands out leases and keeps those not yet ended, so that shutdown can end them all. */
export class VmLeases {
  #admission: Admission
  #pool: VmPool
  #live = new Set<Lease>()

  constructor(admission: Admission, pool: VmPool) {
    this.#admission = admission
    this.#pool = pool
  }

  /** VMs serving a request. */
  get serving(): number {
    return this.#live.size
  }

  /** Waits for a slot, then for a VM; every wait ends with the signal's reason. */
  async take(log: FastifyBaseLogger, signal: AbortSignal): Promise<Lease> {
    const queued = performance.now()
    const release = await this.#admission.acquire(signal)
    const queueMs = performance.now() - queued
    let taken
    try {
      taken = await this.#pool.take(log, signal)
    } catch (error) {
      release()
      throw error
    }
    const lease = new Lease(taken.vm, { queueMs, waitMs: taken.waitMs }, () => {
      this.#live.delete(lease)
      release()
    })
    this.#live.add(lease)
    return lease
  }

  /** Kills the pool's VMs and every leased one now. */
  async destroyAll(reason: Error): Promise<void> {
    await Promise.all([this.#pool.destroy(), ...[...this.#live].map((lease) => lease.end(reason))])
  }
}
