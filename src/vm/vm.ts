// One QEMU process, from spawn to reaping. A VM serves exactly one request.
//
//   created → booting → ready → serving → stopping → stopped
//
// The state changes in one place (#enter) and every change is logged. Whoever
// creates a Vm owns its end: close() (SIGTERM, then SIGKILL after a grace) or
// destroy() (SIGKILL now). Both are idempotent and both wait until QEMU is reaped.

import { randomBytes } from 'node:crypto'
import { mkdtempSync, openSync, renameSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { performance } from 'node:perf_hooks'
import getPort from 'get-port'
import type { FastifyBaseLogger as Logger } from 'fastify'
import type { Config } from '../config.js'
import { VmcgiError } from '../errors.js'
import type { AccelDecision } from './accel.js'
import { Qmp, waitForMigration } from './qmp.js'
import { buildQemuArgs } from './qemu-args.js'
import type { GuestVm, VmFactory, VmState } from './guest.js'
import { Console } from './console.js'
import { QemuProcess } from './qemu-process.js'
import { listensOn, waitUntilReady } from './readiness.js'


/** What every VM of one vmcgi process shares: the config and what the host can do. */
export interface VmEnvironment {
  config: Config
  accel: AccelDecision
  /** Whether QEMU accepts -sandbox. */
  sandbox: boolean
  /** Command prefix that makes QEMU die with vmcgi (setpriv --pdeathsig), or []. */
  deathSignalPrefix: readonly string[]
  /** Clone mode: every VM restores this snapshot instead of booting (see snapshot.ts). */
  snapshot?: SnapshotFiles
}

/** A booted guest saved once: RAM in a file, device state in another. */
export interface SnapshotFiles {
  ramPath: string
  statePath: string
}

/**
 * How a VM comes to life: a cold boot; the template, booted once with its RAM
 * in a shared file and then saved; or a clone, restored from the template.
 */
export type VmMode =
  | { kind: 'boot' }
  | { kind: 'template'; files: SnapshotFiles; qmpSocket: string }
  | { kind: 'clone'; files: SnapshotFiles; qmpSocket: string }


/** QEMU loses a race for a port chosen beforehand with this message; try another port. */
const portTaken = /could not set up host forwarding rule/
const spawnAttempts = 3

export function createQemuVmFactory(env: VmEnvironment): VmFactory {
  return (log) => {
    const vm = env.snapshot
      ? new QemuVm(env, log, { kind: 'clone', files: env.snapshot, qmpSocket: join(runtimeDir(), `${randomBytes(6).toString('hex')}.qmp`) })
      : new QemuVm(env, log)
    return vm
  }
}

/** A private folder for this process's QMP sockets. */
let runtime: string | undefined
function runtimeDir(): string {
  runtime ??= mkdtempSync(join(tmpdir(), 'vmcgi-run-'))
  return runtime
}

/** The fd on which a clone's QEMU reads the template's device state. */
const stateFd = 3

export class QemuVm implements GuestVm {
  readonly id = `vm-${randomBytes(4).toString('hex')}`
  #state: VmState = 'created'
  #env: VmEnvironment
  #log: Logger
  /** The current attempt's QEMU; after a port retry, the last one. */
  #process: QemuProcess | undefined

  #port = 0
  #bootMs = 0
  /** The current attempt's console. */
  #console: Console | undefined
  /** Aborted when the VM is stopped, so that a boot in progress ends at once. */
  #stopping = new AbortController()

  #mode: VmMode

  constructor(env: VmEnvironment, log: Logger, mode: VmMode = { kind: 'boot' }) {
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
    return this.#process?.spawnMs ?? 0
  }

  get accelerated(): boolean {
    return this.#env.accel.accel !== 'tcg'
  }

  consoleTail(): string {
    return this.#console?.text() ?? ''
  }

  /** The current QEMU process's exit (after a port retry, the last one's). */
  get exited(): Promise<void> {
    return (this.#process?.exited ?? Promise.resolve()).then(() => undefined)
  }

  async boot(signal: AbortSignal): Promise<void> {
    this.#expect('created', 'boot')
    this.#enter('booting')
    const { readiness } = this.#env.config
    const deadline = new AbortController()
    const timer = setTimeout(
      () => deadline.abort(new VmcgiError('BOOT_TIMEOUT', `the guest did not answer within ${readiness.timeoutMs} ms`)),
      readiness.timeoutMs,
    )
    const stopped = () => new VmcgiError('VM_EXITED', 'the VM was stopped while it booted')
    const started = performance.now()
    // Milliseconds since `started` at which each step ended, for the debug log.
    const phases: Record<string, number> = {}
    try {
      for (let attempt = 1; ; attempt++) {
        const { qemu, consoleReady } = await this.#spawn()
        const any = AbortSignal.any([signal, deadline.signal, qemu.exitSignal, this.#stopping.signal])
        let stolen = false
        try {
          phases.spawned = performance.now() - started
          if (this.#mode.kind === 'clone') await this.#restore(any)
          phases.restored = performance.now() - started
          // A clone is made unique while its HTTP server is probed: it sees no
          // request before both are done.
          const unique = this.#mode.kind === 'clone' && this.#env.config.vm.snapshot.reseed
            ? this.#makeUnique(any).then(() => (phases.reseeded = performance.now() - started))
            : undefined
          const answered = waitUntilReady({
            host: '127.0.0.1',
            port: this.#port,
            path: readiness.path,
            intervalMs: readiness.intervalMs,
            attemptTimeoutMs: readiness.attemptTimeoutMs,
            signal: any,
            consoleReady,
          }).then(() => (phases.answered = performance.now() - started))
          // Both are awaited together: when `any` aborts, both reject, and
          // neither rejection may go unhandled.
          await Promise.all([answered, unique])
          if (qemu.pid !== undefined && listensOn(qemu.pid, this.#port) === false) {
            // Another process took the port before QEMU could: its answer does not count.
            stolen = true
            qemu.kill('SIGKILL')
            await qemu.exited
            throw new VmcgiError('SPAWN_FAILED', `a process other than QEMU answered on port ${this.#port}`)
          }
          break
        } catch (error) {
          if (signal.aborted) throw signal.reason
          if (this.#stopping.signal.aborted) throw stopped()
          if (qemu.exitSignal.aborted && (stolen || portTaken.test(qemu.stderrTail())) && attempt < spawnAttempts) {
            this.#log.info({ port: this.#port, attempt }, 'host port was taken; retrying with another')
            continue
          }
          throw error
        }
      }
    } catch (error) {
      this.#log.warn({ err: error, console: this.consoleTail(), stderr: this.#process?.stderrTail() }, 'VM failed to boot')
      await this.destroy(error as Error)
      throw error
    } finally {
      clearTimeout(timer)
    }
    this.#bootMs = Math.round(performance.now() - started)
    this.#log.debug({ mode: this.#mode.kind, phases: roundAll(phases), consoleReadyMs: this.#console?.readyMs }, 'VM booted')
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
    this.#process?.kill(signal)
    await this.#process?.exited
    if (this.#mode.kind === 'clone') rmSync(this.#mode.qmpSocket, { force: true })
    if ((this.#state as VmState) !== 'stopped') this.#enter('stopped')
  }

  /**
   * Saves a booted template: its RAM is already in the shared file, so only the
   * device state is written (x-ignore-shared), to a temporary file renamed into
   * place once complete. The template keeps running; stop it afterwards.
   */
  async saveSnapshot(signal: AbortSignal): Promise<void> {
    if (this.#mode.kind !== 'template') throw new VmcgiError('INTERNAL', `${this.id} is not a template`)
    this.#expect('ready', 'snapshot')
    const { files, qmpSocket } = this.#mode
    const partial = `${files.statePath}.partial`
    // A young kernel reseeds its CRNG once its seed is a second old, from the
    // timing jitter it has seen (crng_has_old_seed in drivers/char/random.c),
    // so clones of a template saved with an old seed would drift apart by
    // chance within their first request. Reseeded now, they stay identical
    // until vmcgi reseeds each one: a single mechanism, which tests can show.
    await this.#makeUnique(signal)
    const qmp = await Qmp.connect(qmpSocket, signal)
    try {
      await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] })
      // Saved while running, so that every clone starts running as soon as it is restored.
      await qmp.execute('migrate', { uri: `exec:cat > '${partial.replaceAll("'", "'\\''")}'` })
      await waitForMigration(qmp, signal)
    } finally {
      qmp.close()
    }
    renameSync(partial, files.statePath)
  }

  /**
   * Hands a clone the template's device state on descriptor 3 and waits until
   * it is loaded. Its RAM is the template's file, so only device state is in
   * the stream (x-ignore-shared). The template was saved running, so the clone
   * runs as soon as it is restored.
   */
  async #restore(signal: AbortSignal): Promise<void> {
    if (this.#mode.kind !== 'clone') return
    const qmp = await Qmp.connect(this.#mode.qmpSocket, signal)
    try {
      await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] })
      await qmp.execute('migrate-incoming', { uri: `fd:${stateFd}` })
      // Console input sent before the UART's state is loaded would be lost.
      await waitForMigration(qmp, signal)
    } finally {
      qmp.close()
    }
  }

  /**
   * Clones of one template share its RNG state and clock. Before a clone sees
   * a request, the guest's agent (images/agent.c) takes fresh entropy from here,
   * reseeds its kernel's CRNG, sets the clock, and says so on the console.
   */
  async #makeUnique(signal: AbortSignal): Promise<void> {
    const nonce = randomBytes(8).toString('hex')
    const seed = randomBytes(32).toString('hex')
    const done = this.#console!.waitFor([`vmcgi: reseeded ${nonce}`], signal)
    this.#process!.stdin.write(`vmcgi-seed ${seed} ${Math.floor(Date.now() / 1000)} ${nonce}\n`)
    await done
  }

  /** Starts QEMU on a fresh port. Resolves once spawned, with a promise for the console's ready line. */
  async #spawn(): Promise<{ qemu: QemuProcess; consoleReady: Promise<void> }> {
    const { config, accel, sandbox, deathSignalPrefix } = this.#env
    const mode = this.#mode
    this.#port = await getPort({ host: '127.0.0.1' })
    if (this.#stopping.signal.aborted) throw new VmcgiError('VM_EXITED', 'the VM was stopped before it started')
    const args = buildQemuArgs({
      vm: config.vm,
      accel: accel.accel,
      hostPort: this.#port,
      // The template writes its state through `exec:`, which the sandbox's
      // spawn=deny forbids. It boots vmcgi's own image and never serves a request.
      sandbox: sandbox && mode.kind !== 'template',
      name: this.id,
      memoryFile: mode.kind === 'boot' ? undefined : { path: mode.files.ramPath, share: mode.kind === 'template' },
      qmpSocket: mode.kind === 'boot' ? undefined : mode.qmpSocket,
      incoming: mode.kind === 'clone',
    })
    const qemu = new QemuProcess({
      argv: [...deathSignalPrefix, config.vm.qemu, ...args] as [string, ...string[]],
      killGraceMs: config.vm.killGraceMs,
      inherit: mode.kind === 'clone' ? [openSync(mode.files.statePath, 'r')] : [],
      log: this.#log.child({ port: this.#port }),
    })
    this.#process = qemu
    this.#console = new Console(qemu.stdout, { tailBytes: config.vm.consoleTailBytes, readyLine: config.readiness.consoleLine })
    return { qemu, consoleReady: this.#console.ready }
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
