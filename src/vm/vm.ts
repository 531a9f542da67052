// One VM, from its first QEMU spawn to its last reaping. A VM serves exactly one request.
//
//   created → booting → ready → serving → stopping → stopped
//
// The state changes in one place (#enter) and every change is logged. Whoever
// creates a Vm owns its end: close() (SIGTERM, then SIGKILL after a grace) or
// destroy() (SIGKILL now). Both are idempotent and both wait until QEMU is reaped.
//
// Each spawn attempt has its own QemuProcess and SerialConsole; when QEMU loses the
// race for its port, boot() starts another on a new port. How the VM comes to
// life (a cold boot, the template, a clone) is its StartMode's business (modes.ts).

import { randomBytes } from 'node:crypto'
import { closeSync } from 'node:fs'
import { performance } from 'node:perf_hooks'
import getPort from 'get-port'
import type { FastifyBaseLogger as Logger } from 'fastify'
import type { Config } from '../config.js'
import { VmcgiError } from '../errors.js'
import type { AccelDecision } from './accel.js'
import { SerialConsole } from './console.js'
import { diskPathFor, type HeldDisk } from './disk.js'
import type { GuestVm, VmFactory, VmState } from './guest.js'
import { bootMode, cloneMode, type Attempt, type SnapshotFiles, type StartMode } from './modes.js'
import { buildQemuArgs } from './qemu-args.js'
import { eventsFdAfter, QemuProcess } from './qemu-process.js'
import { findListener, stillHolds, waitUntilReady, type Listener } from './readiness.js'

export type { SnapshotFiles } from './modes.js'

/** What every VM of one vmcgi process shares: the config and what the host can do. */
export interface VmEnvironment {
  config: Config
  accel: AccelDecision
  /** Whether QEMU accepts -sandbox. */
  sandbox: boolean
  /** Command prefix that makes QEMU die with vmcgi (setpriv --pdeathsig, or host.ts's keeper), or []. */
  deathSignalPrefix: readonly string[]
  /** Whether deathSignalPrefix starts a keeper, for a vm.qemu that is a wrapper script (false when left out). */
  keeper?: boolean
  /** Clone mode: every VM restores this snapshot instead of booting (see snapshot.ts). */
  snapshot?: SnapshotFiles
  /** vm.disk, held open (see disk.ts). */
  disk?: HeldDisk
}

/** QEMU loses a race for a port chosen beforehand with this message; try another port. */
const portTaken = /could not set up host forwarding rule/
const spawnAttempts = 3

export function createQemuVmFactory(env: VmEnvironment): VmFactory {
  return (log) => new QemuVm(env, log, env.snapshot ? cloneMode(env.snapshot, env.config.vm.snapshot) : bootMode)
}

export class QemuVm implements GuestVm {
  readonly id = `vm-${randomBytes(4).toString('hex')}`
  #state: VmState = 'created'
  #env: VmEnvironment
  #mode: StartMode
  #log: Logger
  /** The current spawn attempt; after a port retry, the last one. */
  #attempt: Attempt | undefined

  #port = 0
  /** QEMU's descriptor listening on the forwarded port, once booted; undefined where /proc cannot tell. */
  #listener: Listener | undefined
  #bootMs = 0
  /** Aborted when the VM is stopped, so that a boot in progress ends at once. */
  #stopping = new AbortController()

  constructor(env: VmEnvironment, log: Logger, mode: StartMode = bootMode) {
    this.#env = env
    this.#mode = mode
    this.#log = log.child({ vm: this.id })
  }

  get state(): VmState {
    return this.#state
  }

  get origin(): string {
    return `http://127.0.0.1:${this.#port}`
  }

  get bootMs(): number {
    return this.#bootMs
  }

  get spawnMs(): number {
    return this.#attempt?.qemu.spawnMs ?? 0
  }

  get accelerated(): boolean {
    return this.#env.accel.accel !== 'tcg'
  }

  consoleTail(): string {
    return this.#attempt?.console.text() ?? ''
  }

  /** The current QEMU process's exit (after a port retry, the last one's). */
  get exited(): Promise<void> {
    return (this.#attempt?.qemu.exited ?? Promise.resolve()).then(() => undefined)
  }

  /**
   * QEMU running, not shutting down, and still holding its forward. A QEMU
   * whose guest powers off says so on its events monitor before it closes
   * the guest's connections; a killed one loses its descriptors before /proc
   * shows it as a zombie. Either way a connection that just ended is QEMU's.
   */
  async isRunning(): Promise<boolean> {
    const qemu = this.#attempt?.qemu
    if (qemu === undefined || !(await qemu.isRunning())) return false
    return this.#listener === undefined || stillHolds(this.#listener)
  }

  async boot(signal: AbortSignal): Promise<void> {
    this.#expect('created', 'boot')
    this.#enter('booting')
    const { readiness, vm } = this.#env.config
    const deadline = new AbortController()
    // Which port and path were probed: a guest's server on another port is the usual mistake.
    const awaited = this.#mode.readyWhen ?? `answer GET ${readiness.path} on guest port ${vm.guestPort}`
    const timer = setTimeout(
      () => deadline.abort(new VmcgiError('BOOT_TIMEOUT', `the guest did not ${awaited} within ${readiness.timeoutMs} ms`)),
      readiness.timeoutMs,
    )
    const stopped = () => new VmcgiError('VM_EXITED', 'the VM was stopped while it booted')
    const started = performance.now()
    // Milliseconds since `started` at which each step ended, for the debug log.
    const phases: Record<string, number> = {}
    try {
      for (let tries = 1; ; tries++) {
        const attempt = await this.#spawn()
        const { qemu } = attempt
        const any = AbortSignal.any([signal, deadline.signal, qemu.exitSignal, this.#stopping.signal])
        let stolen = false
        try {
          phases.spawned = performance.now() - started
          await this.#mode.restore(attempt, any)
          phases.restored = performance.now() - started
          // A clone is made unique while its HTTP server is probed: it sees no
          // request before both are done.
          const unique = this.#mode.reseed(attempt, any)?.then(() => (phases.reseeded = performance.now() - started))
          const answered = (this.#mode.awaitReady?.(attempt, any) ?? waitUntilReady({
            host: '127.0.0.1',
            port: this.#port,
            path: readiness.path,
            intervalMs: readiness.intervalMs,
            attemptTimeoutMs: readiness.attemptTimeoutMs,
            signal: any,
            consoleReady: attempt.console.ready,
          })).then(() => (phases.answered = performance.now() - started))
          // Both are awaited together: when `any` aborts, both reject, and
          // neither rejection may go unhandled.
          await Promise.all([answered, unique])
          const listener = qemu.pid === undefined ? undefined : findListener(qemu.pid, this.#port)
          if (listener === false) {
            // Another process took the port before QEMU could: its answer does not count.
            stolen = true
            qemu.kill('SIGKILL')
            await qemu.exited
            throw new VmcgiError('SPAWN_FAILED', `a process other than QEMU answered on port ${this.#port}`)
          }
          this.#listener = listener
          break
        } catch (error) {
          if (signal.aborted) throw signal.reason
          if (this.#stopping.signal.aborted) throw stopped()
          if (qemu.exitSignal.aborted && (stolen || portTaken.test(qemu.stderrTail())) && tries < spawnAttempts) {
            this.#log.info({ port: this.#port, attempt: tries }, 'host port was taken; retrying with another')
            continue
          }
          throw error
        }
      }
    } catch (error) {
      this.#log.warn({ err: error, console: this.consoleTail(), stderr: this.#attempt?.qemu.stderrTail() }, 'VM failed to boot')
      await this.destroy(error as Error)
      throw error
    } finally {
      clearTimeout(timer)
    }
    this.#bootMs = Math.round(performance.now() - started)
    this.#log.debug({ mode: this.#mode.name, phases: roundAll(phases), consoleReadyMs: this.#attempt?.console.readyMs }, 'VM booted')
    this.#enter('ready')
  }

  markServing(): void {
    this.#expect('ready', 'serve')
    this.#enter('serving')
  }

  close(): Promise<void> {
    return this.#stop('SIGTERM')
  }

  destroy(reason: Error): Promise<void> {
    if (this.#state !== 'stopped') this.#log.debug({ reason: reason.message }, 'destroying the VM')
    return this.#stop('SIGKILL')
  }

  async #stop(signal: 'SIGTERM' | 'SIGKILL'): Promise<void> {
    if (this.#state === 'stopped') return
    if (this.#state !== 'stopping') {
      this.#enter('stopping')
      this.#stopping.abort()
    }
    // SIGTERM escalates to SIGKILL after vm.killGraceMs (execa's forceKillAfterDelay);
    // a later destroy() sends SIGKILL at once.
    this.#attempt?.qemu.kill(signal)
    await this.#attempt?.qemu.exited
    this.#mode.release()
    if ((this.#state as VmState) !== 'stopped') this.#enter('stopped')
  }

  /** Saves a ready template for clones to restore (see modes.ts); the template keeps running. */
  async saveSnapshot(signal: AbortSignal): Promise<void> {
    if (!this.#mode.save) throw new VmcgiError('INTERNAL', `${this.id} is not a template`)
    this.#expect('ready', 'snapshot')
    await this.#mode.save(this.#attempt!, signal)
  }

  /** Starts QEMU on a fresh port, with a console of its own. Resolves once spawned. */
  async #spawn(): Promise<Attempt> {
    const { config, accel, sandbox, deathSignalPrefix, keeper = false, disk } = this.#env
    try {
      this.#port = await getPort({ host: '127.0.0.1' })
    } catch (error) {
      // No descriptor left for get-port's probe socket (EMFILE), say.
      throw new VmcgiError('SPAWN_FAILED', `no port could be chosen for QEMU: ${(error as Error).message}`, { cause: error })
    }
    if (this.#stopping.signal.aborted) throw new VmcgiError('VM_EXITED', 'the VM was stopped before it started')
    // The mode's descriptors come first (a clone's are at fixed numbers), then the disk's.
    const inherit = this.#mode.openInherited()
    if (disk) {
      try {
        inherit.push(disk.reopen())
      } catch (error) {
        for (const fd of inherit) closeSync(fd)
        throw error
      }
    }
    const args = buildQemuArgs({
      vm: config.vm,
      accel: accel.accel,
      hostPort: this.#port,
      sandbox: sandbox && this.#mode.sandbox,
      name: this.id,
      ...this.#mode.args,
      ...(disk ? { diskPath: diskPathFor(disk, 2 + inherit.length) } : {}),
      eventsFd: eventsFdAfter(inherit),
    })
    const log = this.#log.child({ port: this.#port })
    const qemu = new QemuProcess({
      argv: [...deathSignalPrefix, config.vm.qemu, ...args] as [string, ...string[]],
      killGraceMs: config.vm.killGraceMs,
      inherit,
      keeper,
      events: true,
      log,
    })
    this.#attempt = {
      qemu,
      console: new SerialConsole(qemu.stdout, { tailBytes: config.vm.consoleTailBytes, readyLine: config.readiness.consoleLine }),
      log,
    }
    return this.#attempt
  }

  #expect(state: VmState, operation: string): void {
    if (this.#state !== state) {
      throw new VmcgiError('INTERNAL', `cannot ${operation} ${this.id}: it is ${this.#state}, not ${state}`)
    }
  }

  #enter(to: VmState): void {
    this.#log.debug({ from: this.#state, to }, 'VM state')
    this.#state = to
  }
}

function roundAll(values: Record<string, number>): Record<string, number> {
  return Object.fromEntries(Object.entries(values).map(([key, value]) => [key, Math.round(value)]))
}
