// Where a request's VM comes from. With `pool.size` = N > 0, N VMs are booted
// ahead of demand and each serves exactly one request; a replacement boots in
// the background once the one taken has served its request (see
// defaultRefillDelayMs). When the pool is empty, a request
// takes the next replacement that finishes booting, unwarmed, if one is
// booting that no other request waits for; else (a larger burst, or size 0)
// it boots its own VM, as it would without a pool. So under load the pool
// boots no VM that a request does not use, and warms up none that a request
// waits for: it never costs throughput, which on a machine of few cores a
// refill competing with the requests' own boots would.

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

/**
 * A VM taken from the pool is replaced once it has exited (its request
 * served, it is killed), or this long after it was taken if its request
 * takes longer. Started at once, the replacement (a fork of vmcgi, then a
 * QEMU booting or restoring on the same few cores) ran beside the request it
 * was taken for, and cost a pooled clone's request 40% of its latency.
 */
const defaultRefillDelayMs = 100

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
  /** Requests waiting for a refill to finish booting; given undefined when it failed or the pool closed. */
  #waiters: Array<(vm: GuestVm | undefined) => void> = []

  #onBooted: (vm: GuestVm) => void
  #warmUp: (vm: GuestVm) => Promise<void>
  #refillDelayMs: number

  /**
   * `onBooted` hears of every VM that boots, for the pool or for a request;
   * `warmUp` runs on a pooled VM before it is handed out; `refillDelayMs`
   * is for tests.
   */
  constructor(size: number, createVm: VmFactory, log: FastifyBaseLogger, hooks: {
    onBooted?: (vm: GuestVm) => void
    warmUp?: (vm: GuestVm) => Promise<void>
    refillDelayMs?: number
  } = {}) {
    this.#size = size
    this.#createVm = createVm
    this.#log = log
    this.#onBooted = hooks.onBooted ?? (() => {})
    this.#warmUp = hooks.warmUp ?? (async () => {})
    this.#refillDelayMs = hooks.refillDelayMs ?? defaultRefillDelayMs
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
      this.#refillAfter(warm)
      // A warm VM that died or was frozen (SIGSTOP) while it waited serves nobody.
      if (!(await warm.isRunning())) {
        log.warn({ vm: warm.id, console: warm.consoleTail() }, 'a warm VM was not running when taken; dropping it')
        void warm.destroy(new VmcgiError('VM_EXITED', 'the warm VM was not running when taken'))
        continue
      }
      log.debug({ vm: warm.id }, 'took a warm VM from the pool')
      return { vm: warm, waitMs: 0, warm: true }
    }
    if (this.#refilling > this.#waiters.length) {
      const adopted = await this.#nextRefill(signal)
      if (adopted) {
        log.debug({ vm: adopted.id }, 'took a VM the pool had been booting')
        return { vm: adopted, waitMs: performance.now() - started, warm: false }
      }
      if (this.#closed) throw new VmcgiError('SHUTTING_DOWN', 'vmcgi is shutting down')
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

  /** Waits for the next refill to boot; undefined when it failed, or the pool closed. */
  #nextRefill(signal: AbortSignal): Promise<GuestVm | undefined> {
    signal.throwIfAborted()
    return new Promise((resolve, reject) => {
      const waiter = (vm: GuestVm | undefined) => {
        signal.removeEventListener('abort', onAbort)
        resolve(vm)
      }
      const onAbort = () => {
        this.#waiters.splice(this.#waiters.indexOf(waiter), 1)
        reject(signal.reason)
      }
      signal.addEventListener('abort', onAbort, { once: true })
      this.#waiters.push(waiter)
    })
  }

  /** Gives a just-booted VM to the request that has waited longest, if one waits. */
  #handOff(vm: GuestVm | undefined): boolean {
    const waiter = this.#waiters.shift()
    waiter?.(vm)
    return waiter !== undefined
  }

  /** Refuses new work and kills every VM the pool holds or is booting. */
  async destroy(): Promise<void> {
    this.#closed = true
    while (this.#handOff(undefined));
    clearTimeout(this.#backoff)
    const all = [...this.#ready, ...this.#booting]
    this.#ready = []
    const reason = new VmcgiError('SHUTTING_DOWN', 'the pool is closing')
    await Promise.all(all.map((vm) => vm.destroy(reason)))
  }

  /** Refills once `taken` has exited, or #refillDelayMs from now, whichever is first. */
  #refillAfter(taken: GuestVm): void {
    let pending = true
    const refill = () => {
      if (!pending) return
      pending = false
      clearTimeout(timer)
      this.#refill()
    }
    const timer = setTimeout(refill, this.#refillDelayMs)
    timer.unref()
    void taken.exited.then(refill, refill)
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
      // A request waiting for a VM is not kept waiting for the warm-up too.
      if (!this.#closed && this.#handOff(vm)) return
      await this.#warmUp(vm)
    } catch (error) {
      await vm.destroy(error as Error)
      // The request that waited for this one boots its own.
      this.#handOff(undefined)
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
    if (this.#handOff(vm)) return
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
