// One QEMU process, one spawn attempt: started with execa, its stderr's tail kept, its exit told with a reason.
//
// Whoever spawns one owns its end: kill('SIGTERM') escalates to SIGKILL after
// the grace given at spawn (execa's forceKillAfterDelay), kill('SIGKILL') is at
// once, and `exited` resolves once the process is reaped, whatever ended it.

import { closeSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { performance } from 'node:perf_hooks'
import type { Readable, Writable } from 'node:stream'
import { execa, type ResultPromise } from 'execa'
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
   * copies once QEMU has been spawned with them.
   */
  inherit?: readonly number[]
  log: Logger
}

export class QemuProcess {
  #child: ResultPromise
  #stderr = new Tail(stderrTailBytes)
  #exit = new AbortController()
  #spawnMs = 0
  /** Resolves once QEMU is reaped, with why it ended. */
  readonly exited: Promise<VmcgiError>

  /** Spawns QEMU. */
  constructor({ argv, killGraceMs, inherit = [], log }: SpawnOptions) {
    const [file, ...args] = argv
    try {
      this.#child = execa(file, args, {
        // execa passes a number through as an inherited descriptor; its types do not say so.
        stdio: ['pipe', 'pipe', 'pipe', ...inherit] as unknown as ['pipe', 'pipe', 'pipe'],
        buffer: false,
        reject: false,
        cleanup: true,
        forceKillAfterDelay: Math.max(1, killGraceMs),
      })
    } finally {
      // QEMU has its own copies of the descriptors once spawned.
      for (const fd of inherit) closeSync(fd)
    }
    const started = performance.now()
    this.#child.once('spawn', () => (this.#spawnMs = performance.now() - started))
    this.#child.stderr!.on('data', (chunk: Buffer) => this.#stderr.push(chunk))
    this.exited = this.#child.then((result) => {
      log.debug({ exitCode: result.exitCode, signal: result.signal }, 'QEMU exited')
      const neverRan = result.exitCode === undefined && !result.signal
      // QEMU says why it refused to start (too many CPUs, too much memory) on its last stderr line.
      const said = this.#stderr.text().trim().split('\n').at(-1)
      const reason = neverRan
        ? new VmcgiError('SPAWN_FAILED', `QEMU could not be started: ${result.shortMessage}`)
        : new VmcgiError('VM_EXITED', `QEMU exited (${result.signal ?? `status ${result.exitCode}`})${said ? `: ${said}` : ''}`)
      this.#exit.abort(reason)
      return reason
    })
    log.debug({ argv }, 'QEMU spawned')
  }

  /** Undefined when QEMU could not be started. */
  get pid(): number | undefined {
    return this.#child.pid
  }

  /** Milliseconds from asking for the process to its start. */
  get spawnMs(): number {
    return this.#spawnMs
  }

  /** The serial console. */
  get stdout(): Readable {
    return this.#child.stdout!
  }

  /** Console input. */
  get stdin(): Writable {
    return this.#child.stdin!
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
    this.#child.kill(signal)
  }
}
