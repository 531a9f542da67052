// The face of a VM that the server, the pool and the tests see. No QEMU and no
// execa here: src/vm/vm.ts implements it, test/helpers/fake-vm.ts fakes it.

import type { FastifyBaseLogger } from 'fastify'

export type VmState = 'created' | 'booting' | 'ready' | 'serving' | 'stopping' | 'stopped'

export interface GuestVm {
  readonly id: string
  readonly state: VmState
  /** http://127.0.0.1:PORT once booted. */
  readonly origin: string
  /** Milliseconds from spawning QEMU to the guest's first HTTP answer. */
  readonly bootMs: number
  /** The part of bootMs until the QEMU process had started. */
  readonly spawnMs: number
  readonly accelerated: boolean
  boot(signal: AbortSignal): Promise<void>
  /** Resolves once QEMU has exited, for whatever reason; ask after boot(). */
  readonly exited: Promise<void>
  /**
   * Whether QEMU is running at this moment. A guest's connection that ends
   * may mean the guest ended its answer or that QEMU died: this tells which,
   * even before the exit has been reaped.
   */
  isRunning(): Promise<boolean>
  markServing(): void
  consoleTail(): string
  /** Graceful: SIGTERM, then SIGKILL after vm.killGraceMs. Idempotent; resolves once reaped. */
  close(): Promise<void>
  /** Abrupt: SIGKILL now, logging why. Idempotent; resolves once reaped. */
  destroy(reason: Error): Promise<void>
}

export type VmFactory = (log: FastifyBaseLogger) => GuestVm
