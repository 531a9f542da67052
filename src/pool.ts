// Where a request's VM comes from. With `pool.size` = N > 0, N VMs are booted
// ahead of demand and each serves exactly one request; a replacement boots in
// the background as soon as one is taken. When the pool is empty (a burst, or
// size 0) the request boots its own VM, as it would without a pool.

import { performance } from 'node:perf_hooks'
import type { FastifyBaseLogger } from 'fastify'
import { VmcgiError } from './errors.js'
import type { GuestVm, VmFactory } from './vm/guest.js'

export interface TakenVm {
  vm: GuestVm
  /** How long the request waited for its VM: 0 when a warm one was ready. */
  waitMs: number
  warm: boolean
}

/** After a failed background boot, wait this long before the next, so a broken guest does not spin. */
const refillBackoffMs = 1_000

export class VmPool {
  #size: number
  #createVm: VmFactory
  #log: FastifyBaseLogger
  #ready: GuestVm[] = []
  /** Booting: for the pool, or for a request that found the pool empty. */
  #booting = new Set<GuestVm>()
  #refilling = 0
  #closed = false
  #backoff: NodeJS.Timeout | undefined

  #onBooted: (vm: GuestVm) => void
  #warmUp: (vm: GuestVm) => Promise<void>

  /**
   * `onBooted` hears of every VM that boots, for the pool or for a request;
   * `warmUp` runs on a pooled VM before it is handed out.
   */
  constructor(size: number, createVm: VmFactory, log: FastifyBaseLogger, hooks: {
    onBooted?: (vm: GuestVm) => void
    warmUp?: (vm: GuestVm) => Promise<void>
  } = {}) {
    this.#size = size
    this.#createVm = createVm
    this.#log = log
    this.#onBooted = hooks.onBooted ?? (() => {})
    this.#warmUp = hooks.warmUp ?? (async () => {})
  }

  /** VMs booted and waiting for a request. */
  get ready(): number {
    return this.#ready.length
  }

  /** VMs booting, for the pool or for a request. */
  get booting(): number {
    return this.#booting.size
  }

  /** Starts filling the pool. */
  start(): void {
    this.#refill()
  }

  async take(log: FastifyBaseLogger, signal: AbortSignal): Promise<TakenVm> {
    if (this.#closed) throw new VmcgiError('SHUTTING_DOWN', 'vmcgi is shutting down')
    const started = performance.now()
    for (let warm = this.#ready.shift(); warm; warm = this.#ready.shift()) {
      this.#refill()
      // A warm VM that died or was frozen (SIGSTOP) while it waited serves nobody.
      if (!(await warm.isRunning())) {
        log.warn({ vm: warm.id, console: warm.consoleTail() }, 'a warm VM was not running when taken; dropping it')
        void warm.destroy(new VmcgiError('VM_EXITED', 'the warm VM was not running when taken'))
        continue
      }
      log.debug({ vm: warm.id }, 'took a warm VM from the pool')
      return { vm: warm, waitMs: 0, warm: true }
    }
    const vm = this.#createVm(log)
    this.#booting.add(vm)
    try {
      await vm.boot(signal)
    } catch (error) {
      await vm.destroy(error as Error)
      throw error
    } finally {
      this.#booting.delete(vm)
    }
    this.#onBooted(vm)
    return { vm, waitMs: performance.now() - started, warm: false }
  }

  /** Refuses new work and kills every VM the pool holds or is booting. */
  async destroy(): Promise<void> {
    this.#closed = true
    clearTimeout(this.#backoff)
    const all = [...this.#ready, ...this.#booting]
    this.#ready = []
    const reason = new VmcgiError('SHUTTING_DOWN', 'the pool is closing')
    await Promise.all(all.map((vm) => vm.destroy(reason)))
  }

  #refill(): void {
    while (!this.#closed && this.#backoff === undefined && this.#ready.length + this.#refilling < this.#size) {
      this.#refilling++
      void this.#bootOne().finally(() => {
        this.#refilling--
        this.#refill()
      })
    }
  }

  async #bootOne(): Promise<void> {
    const vm = this.#createVm(this.#log)
    this.#booting.add(vm)
    try {
      await vm.boot(new AbortController().signal)
      this.#onBooted(vm)
      await this.#warmUp(vm)
    } catch (error) {
      await vm.destroy(error as Error)
      if (this.#closed) return
      this.#log.warn({ err: error, vm: vm.id }, `pool VM failed to boot; retrying in ${refillBackoffMs} ms`)
      // Several boots may fail together: one backoff for all of them.
      clearTimeout(this.#backoff)
      this.#backoff = setTimeout(() => {
        this.#backoff = undefined
        this.#refill()
      }, refillBackoffMs)
      return
    } finally {
      this.#booting.delete(vm)
    }
    if (this.#closed) {
      await vm.destroy(new VmcgiError('SHUTTING_DOWN', 'the pool closed while the VM booted'))
      return
    }
    this.#ready.push(vm)
    this.#log.info({ vm: vm.id, bootMs: vm.bootMs, pooled: this.#ready.length }, 'warm VM ready')
    // A warm VM that dies while it waits is dropped and replaced.
    void vm.exited.then(() => {
      const index = this.#ready.indexOf(vm)
      if (index === -1) return
      this.#ready.splice(index, 1)
      this.#log.warn({ vm: vm.id, console: vm.consoleTail() }, 'a warm VM exited while it waited; replacing it')
      this.#refill()
    })
  }
}
