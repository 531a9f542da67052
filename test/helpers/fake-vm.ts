// A stand-in for a QEMU VM: its "guest" is an HTTP server on loopback that
// the test provides. It records how it was ended, so that tests can check that
// every VM is stopped.

import { createServer, type RequestListener, type Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import { onTestFinished } from 'vitest'
import { VmcgiError } from '../../src/errors.js'
import type { GuestVm, VmFactory, VmState } from '../../src/vm/guest.js'

export type BootBehaviour = 'ok' | 'hang' | 'exit'

export class FakeVm implements GuestVm {
  static count = 0
  readonly id = `fake-${++FakeVm.count}`
  state: VmState = 'created'
  bootMs = 0
  spawnMs = 0
  readonly accelerated = false
  #guest: Server | undefined
  #behaviour: BootBehaviour
  #handler: RequestListener
  #endedResolve: () => void = () => {}
  /** Resolves once the VM has been stopped. */
  readonly ended = new Promise<void>((resolve) => (this.#endedResolve = resolve))

  constructor(behaviour: BootBehaviour, handler: RequestListener) {
    this.#behaviour = behaviour
    this.#handler = handler
  }

  get exited(): Promise<void> {
    return this.ended
  }

  get origin(): string {
    return `http://127.0.0.1:${(this.#guest!.address() as AddressInfo).port}`
  }

  /** Holds the boot until it resolves, for a test to choose when a VM is up. */
  bootGate: Promise<void> = Promise.resolve()

  async boot(signal: AbortSignal): Promise<void> {
    this.state = 'booting'
    await this.bootGate
    if (this.#behaviour === 'exit') throw new VmcgiError('VM_EXITED', 'QEMU exited (status 1)')
    if (this.#behaviour === 'hang') {
      await new Promise((_resolve, reject) => signal.addEventListener('abort', () => reject(signal.reason)))
    }
    this.#guest = createServer(this.#handler)
    await new Promise<void>((resolve) => this.#guest!.listen(0, '127.0.0.1', resolve))
    this.bootMs = 42
    this.spawnMs = 2
    this.state = 'ready'
  }

  /** Stands for a QEMU stopped by SIGSTOP: not stopped as a VM, but running no more. */
  frozen = false

  async isRunning(): Promise<boolean> {
    return this.state !== 'stopped' && !this.frozen
  }

  markServing(): void {
    this.state = 'serving'
  }

  consoleTail(): string {
    return 'fake console\n'
  }

  /** How long after its end `exited` resolves. */
  reapDelayMs = 0

  /** Why the VM was destroyed; undefined after close(). */
  destroyedFor: Error | undefined

  async close(): Promise<void> {
    return this.#end()
  }

  async destroy(reason: Error): Promise<void> {
    if (this.state !== 'stopped') this.destroyedFor = reason
    return this.#end()
  }

  async #end(): Promise<void> {
    if (this.state === 'stopped') return
    this.state = 'stopped'
    this.#guest?.closeAllConnections()
    await new Promise((resolve) => (this.#guest ? this.#guest.close(resolve) : resolve(undefined)))
    // A real QEMU's sockets close as it dies; its reaping is told later.
    if (this.reapDelayMs > 0) await new Promise((resolve) => setTimeout(resolve, this.reapDelayMs))
    this.#endedResolve()
  }
}

/** A factory that makes FakeVms and remembers them; each is destroyed when the test ends. */
export function fakeVmFactory(behaviour: BootBehaviour, handler: RequestListener): { createVm: VmFactory; vms: FakeVm[] } {
  const vms: FakeVm[] = []
  onTestFinished(() => Promise.all(vms.map((vm) => vm.destroy(new Error('the test ended')))).then(() => undefined))
  return {
    vms,
    createVm: () => {
      const vm = new FakeVm(behaviour, handler)
      vms.push(vm)
      return vm
    },
  }
}
