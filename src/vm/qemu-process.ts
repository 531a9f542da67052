// One QEMU process, one spawn attempt: started with node:child_process, its stderr's tail kept, its exit told with a reason.
//
// Whoever spawns one owns its end: kill('SIGTERM') escalates to SIGKILL after
// the grace given at spawn, kill('SIGKILL') is at once, and `exited` resolves
// once the process is reaped, whatever ended it. A spawn that fails (no such
// program, no descriptor left) is an exit too, with SPAWN_FAILED: nothing is
// thrown and no 'error' event goes unhandled.
//
// Not execa: after a spawn that fails with EMFILE or ENFILE, Node's child has
// no stdio at all (nodejs/node#14166), and execa 9.6.1 then throws from
// `[...subprocess.stdio]` and leaves the child's 'error' event unhandled, which
// ends vmcgi.

import { spawn, type ChildProcess } from 'node:child_process'
import { closeSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { performance } from 'node:perf_hooks'
import { Readable, Writable } from 'node:stream'
import type { FastifyBaseLogger as Logger } from 'fastify'
import { VmcgiError } from '../errors.js'
import { Tail } from './tail.js'

const stderrTailBytes = 4096

export interface SpawnOptions {
  /** The program, then its arguments (a death-signal prefix first, if any). */
  argv: readonly [string, ...string[]]
  /** Time between SIGTERM and SIGKILL. */
  killGraceMs: number
  /**
   * Descriptors the process inherits as 3, 4, …; this process closes its own
   * copies once QEMU has been spawned with them (or could not be).
   */
  inherit?: readonly number[]
  log: Logger
}

/** QEMUs not yet reaped: killed if vmcgi exits first (the death-signal prefix also covers a vmcgi killed outright). */
const unreaped = new Set<ChildProcess>()
let killsOnExit = false

function killOnExit(child: ChildProcess): void {
  if (!killsOnExit) {
    killsOnExit = true
    process.on('exit', () => {
      for (const each of unreaped) each.kill('SIGKILL')
    })
  }
  unreaped.add(child)
}

export class QemuProcess {
  #child: ChildProcess | undefined
  #stdout: Readable
  #stdin: Writable
  #stderr = new Tail(stderrTailBytes)
  #exit = new AbortController()
  #killGraceMs: number
  #forceKill: NodeJS.Timeout | undefined
  #spawnMs = 0
  /** Resolves once QEMU is reaped (or could not be started), with why it ended. */
  readonly exited: Promise<VmcgiError>

  /** Spawns QEMU. */
  constructor({ argv, killGraceMs, inherit = [], log }: SpawnOptions) {
    const [file, ...args] = argv
    this.#killGraceMs = Math.max(1, killGraceMs)
    let settle!: (reason: VmcgiError) => void
    this.exited = new Promise((resolve) => (settle = resolve))
    const end = (reason: VmcgiError) => {
      if (this.#exit.signal.aborted) return
      clearTimeout(this.#forceKill)
      if (this.#child) unreaped.delete(this.#child)
      this.#exit.abort(reason)
      settle(reason)
    }
    const couldNotStart = (error: unknown) => {
      log.debug({ err: error }, 'QEMU could not be started')
      end(new VmcgiError('SPAWN_FAILED', `QEMU could not be started: ${(error as Error).message}`, { cause: error }))
    }

    try {
      this.#child = spawn(file, args, { stdio: ['pipe', 'pipe', 'pipe', ...inherit] })
    } catch (error) {
      // Most failures are told by 'error' below; a few (E2BIG, say) are thrown.
      couldNotStart(error)
    } finally {
      // QEMU has its own copies of the descriptors once spawned.
      for (const fd of inherit) closeSync(fd)
    }
    const child = this.#child
    // A child that could not be started may have no stdio: these stand in, ended and bottomless.
    this.#stdout = child?.stdout ?? Readable.from([])
    this.#stdin = child?.stdin ?? new Writable({ write: (_chunk, _encoding, done) => done() })
    if (!child) return

    killOnExit(child)
    const started = performance.now()
    let spawned = false
    child.once('spawn', () => {
      spawned = true
      this.#spawnMs = performance.now() - started
    })
    child.on('error', (error) => {
      // After the spawn, 'error' means a signal could not be sent; the exit is still to come.
      if (spawned) log.warn({ err: error }, 'QEMU could not be signalled')
      else couldNotStart(error)
    })
    // A write into a QEMU that died, and the like: its exit says what happened.
    for (const stream of [child.stdin, child.stdout, child.stderr]) stream?.on('error', () => {})
    child.stderr?.on('data', (chunk: Buffer) => this.#stderr.push(chunk))
    // 'close': exited, and its stderr read to the end, so that its last line is known.
    child.once('close', (exitCode: number | null, signal: NodeJS.Signals | null) => {
      if (!spawned) return
      log.debug({ exitCode, signal }, 'QEMU exited')
      // QEMU says why it refused to start (too many CPUs, too much memory) on its last stderr line.
      const said = this.#stderr.text().trim().split('\n').at(-1)
      end(new VmcgiError('VM_EXITED', `QEMU exited (${signal ?? `status ${exitCode}`})${said ? `: ${said}` : ''}`))
    })
    log.debug({ argv }, 'QEMU spawned')
  }

  /** Undefined when QEMU could not be started. */
  get pid(): number | undefined {
    return this.#child?.pid
  }

  /** Milliseconds from asking for the process to its start. */
  get spawnMs(): number {
    return this.#spawnMs
  }

  /** The serial console. */
  get stdout(): Readable {
    return this.#stdout
  }

  /** Console input. */
  get stdin(): Writable {
    return this.#stdin
  }

  /** Aborts, with the reason `exited` resolves with, once QEMU has exited. */
  get exitSignal(): AbortSignal {
    return this.#exit.signal
  }

  /**
   * False once QEMU has exited, even before it is reaped, and while it is
   * stopped by a signal. A killed QEMU's sockets close before its exit is
   * told; on Linux /proc shows it as a zombie (or gone) at once. Elsewhere
   * only the reaping tells.
   */
  async isRunning(): Promise<boolean> {
    if (this.#exit.signal.aborted || this.pid === undefined) return false
    if (process.platform !== 'linux') return true
    try {
      const stat = await readFile(`/proc/${this.pid}/stat`, 'latin1')
      // pid (comm) state …: comm may hold spaces and parentheses, the state follows the last ')'.
      const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3)
      // Z and X: dead, not yet reaped; T: stopped by a signal (SIGSTOP), and answering nothing.
      return !['Z', 'X', 'T'].includes(state)
    } catch {
      return false
    }
  }

  stderrTail(): string {
    return this.#stderr.text()
  }

  /** SIGTERM escalates to SIGKILL after the grace; SIGKILL is at once. Harmless once exited. */
  kill(signal: 'SIGTERM' | 'SIGKILL'): void {
    const child = this.#child
    // Node sends nothing to a child it has reaped, so a pid used again is safe.
    if (!child || this.#exit.signal.aborted) return
    child.kill(signal)
    if (signal === 'SIGTERM') this.#forceKill ??= setTimeout(() => child.kill('SIGKILL'), this.#killGraceMs)
  }
}
