// One QEMU process, one spawn attempt: started with node:child_process, its stderr's tail kept, its exit told with a reason.
//
// Whoever spawns one owns its end: kill('SIGTERM') escalates to SIGKILL after
// the grace given at spawn, kill('SIGKILL') is at once, and `exited` resolves
// once the process is reaped, whatever ended it. A spawn that fails (no such
// program, no descriptor left) is an exit too, with SPAWN_FAILED: nothing is
// thrown and no 'error' event goes unhandled.
//
// The process leads a process group of its own, and signals go to the whole
// group: a vm.qemu that is a wrapper script which does not exec QEMU makes
// QEMU a grandchild, which a signal to the child alone would not reach. Once
// the child has exited, or has been sent SIGKILL, `exited` waits at most
// reapMs more for its stdio to close, since a process that left the group
// may hold it open for ever.
//
// Not execa: after a spawn that fails with EMFILE or ENFILE, Node's child has
// no stdio at all (nodejs/node#14166), and execa 9.6.1 then throws from
// `[...subprocess.stdio]` and leaves the child's 'error' event unhandled, which
// ends vmcgi.

import { spawn, type ChildProcess } from 'node:child_process'
import { closeSync } from 'node:fs'
import { performance } from 'node:perf_hooks'
import type { Socket } from 'node:net'
import { Readable, Writable } from 'node:stream'
import { setImmediate as nextTurn } from 'node:timers/promises'
import type { FastifyBaseLogger as Logger } from 'fastify'
import { VmcgiError } from '../errors.js'
import { groupMembers, isLive, readStat, signalGroup } from './process-group.js'
import { Tail } from './tail.js'

const stderrTailBytes = 4096
/** After the child's exit or a SIGKILL to its group, how long `exited` waits for its stdio to close. */
const reapMs = 1_000

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
  /**
   * The program is a keeper (host.ts) that starts a wrapper script and waits
   * for it, rather than QEMU: QEMU is another process of its group.
   */
  keeper?: boolean
  /**
   * QEMU has a QMP monitor (qemu-args' eventsFd) on the descriptor after the
   * inherited ones: a socket this process makes and reads for QEMU's events.
   */
  events?: boolean
  log: Logger
}

/** The descriptor QEMU finds its events monitor on (SpawnOptions.events): the one after those it inherits. */
export function eventsFdAfter(inherit: readonly number[]): number {
  return 3 + inherit.length
}

/** QEMUs not yet reaped: killed if vmcgi exits first (the death-signal prefix also covers a vmcgi killed outright). */
const unreaped = new Set<ChildProcess>()
let killsOnExit = false

function killOnExit(child: ChildProcess): void {
  if (!killsOnExit) {
    killsOnExit = true
    process.on('exit', () => {
      for (const each of unreaped) if (each.pid !== undefined) signalGroup(each.pid, 'SIGKILL')
    })
  }
  unreaped.add(child)
}

interface ExitStatus {
  exitCode: number | null
  signal: NodeJS.Signals | null
}

export class QemuProcess {
  #child: ChildProcess | undefined
  #stdout: Readable
  #stdin: Writable
  #stderr = new Tail(stderrTailBytes)
  #exit = new AbortController()
  #killGraceMs: number
  #forceKill: NodeJS.Timeout | undefined
  /** Ends the wait for the stdio to close, reapMs after the child's exit or a SIGKILL. */
  #giveUp: NodeJS.Timeout | undefined
  #keeper: boolean
  #log: Logger
  /** The child's exit status and signal, once it has exited. */
  #exitStatus: ExitStatus | undefined
  #end: (reason: VmcgiError) => void
  #spawnMs = 0
  /** QEMU's reason for shutting down (`guest-shutdown`, `host-signal`, …), once it has said so on its events monitor. */
  #shutdown: string | undefined
  /** Resolves once QEMU is reaped (or could not be started), with why it ended. */
  readonly exited: Promise<VmcgiError>

  /** Spawns QEMU. */
  constructor({ argv, killGraceMs, inherit = [], keeper = false, events = false, log }: SpawnOptions) {
    const [file, ...args] = argv
    this.#killGraceMs = Math.max(1, killGraceMs)
    this.#keeper = keeper
    this.#log = log
    let settle!: (reason: VmcgiError) => void
    this.exited = new Promise((resolve) => (settle = resolve))
    const end = (this.#end = (reason: VmcgiError) => {
      if (this.#exit.signal.aborted) return
      clearTimeout(this.#forceKill)
      clearTimeout(this.#giveUp)
      const child = this.#child
      if (child?.pid !== undefined) {
        // What is left of the group (a process of a wrapper that holds no stdio) ends with it.
        signalGroup(child.pid, 'SIGKILL')
        unreaped.delete(child)
      }
      this.#exit.abort(reason)
      settle(reason)
    })
    const couldNotStart = (error: unknown) => {
      log.debug({ err: error }, 'QEMU could not be started')
      end(new VmcgiError('SPAWN_FAILED', `QEMU could not be started: ${(error as Error).message}`, { cause: error }))
    }

    try {
      // detached: the child leads a new process group (and session), so that the group can be signalled.
      this.#child = spawn(file, args, { stdio: ['pipe', 'pipe', 'pipe', ...inherit, ...(events ? ['pipe' as const] : [])], detached: true })
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
    // After a failed spawn (EMFILE) the child may have no stdio at all (see above).
    const stdio = (child.stdio ?? []) as readonly (Readable | Writable | null | undefined)[]
    for (const stream of stdio) stream?.on('error', () => {})
    const monitor = stdio[eventsFdAfter(inherit)]
    if (events && monitor) this.#watch(monitor as Socket)
    child.stderr?.on('data', (chunk: Buffer) => this.#stderr.push(chunk))
    // 'exit' comes first; what the child started may still run, and hold its stdio.
    child.once('exit', (exitCode: number | null, signal: NodeJS.Signals | null) => {
      if (!spawned) return
      this.#exitStatus = { exitCode, signal }
      // Within a SIGTERM's grace the rest of the group may still be exiting; otherwise it ends now.
      if (this.#forceKill === undefined) this.#killGroup()
    })
    // 'close': exited, and its stderr read to the end, so that its last line is known.
    child.once('close', (exitCode: number | null, signal: NodeJS.Signals | null) => {
      if (!spawned) return
      log.debug({ exitCode, signal }, 'QEMU exited')
      end(this.#exitReason({ exitCode, signal }))
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
   * False once QEMU has announced its shutdown (see #watch) or has exited,
   * even before it is reaped, and while it is stopped by a signal. A killed
   * QEMU's sockets close before its exit is told; on Linux /proc shows it as
   * a zombie (or gone) at once. Elsewhere only the reaping tells.
   */
  async isRunning(): Promise<boolean> {
    // QEMU announced its shutdown before it closed anything: a turn of the
    // event loop lets what it wrote be read, the SHUTDOWN before its effects.
    await nextTurn()
    const pid = this.pid
    if (this.#exit.signal.aborted || pid === undefined || this.#shutdown !== undefined) return false
    if (process.platform !== 'linux') return true
    // Under a keeper, QEMU is one of the others of its group (the wrapper may be another).
    if (this.#keeper) return groupMembers(pid).some((member) => member.pid !== pid && isLive(member.state))
    const stat = readStat(pid)
    return stat !== undefined && isLive(stat.state)
  }

  stderrTail(): string {
    return this.#stderr.text()
  }

  /** SIGTERM escalates to SIGKILL after the grace; SIGKILL is at once. Harmless once exited. */
  kill(signal: 'SIGTERM' | 'SIGKILL'): void {
    if (this.pid === undefined || this.#exit.signal.aborted) return
    if (signal === 'SIGKILL') return this.#killGroup()
    // A group whose processes are all gone may have its id used again, as a
    // process's; but not as a group's at once, and `exited` is due by then.
    if (signalGroup(this.pid, 'SIGTERM') === 'refused') this.#log.warn({ pid: this.pid }, 'QEMU\'s process group could not be sent SIGTERM')
    this.#forceKill ??= setTimeout(() => this.#killGroup(), this.#killGraceMs)
  }

  /** SIGKILL to the group; `exited` then waits reapMs at most for the stdio to close. */
  #killGroup(): void {
    const pid = this.pid!
    clearTimeout(this.#forceKill)
    if (signalGroup(pid, 'SIGKILL') === 'refused') this.#log.warn({ pid }, 'QEMU\'s process group could not be sent SIGKILL')
    this.#giveUp ??= setTimeout(() => {
      const status = this.#exitStatus
      this.#log.warn({ pid, ...status }, `QEMU's stdio was still open ${reapMs} ms after SIGKILL; closed`)
      for (const stream of [this.#child?.stdin, this.#child?.stdout, this.#child?.stderr]) stream?.destroy()
      this.#end(status ? this.#exitReason(status) : new VmcgiError('VM_EXITED', `QEMU did not exit within ${reapMs} ms of SIGKILL`))
    }, reapMs)
  }

  /**
   * Reads QEMU's events monitor: leaves capabilities negotiation (events come
   * only after it), then notes SHUTDOWN, which QEMU sends when its guest
   * powers off or it is told to quit, before it tears down its devices,
   * networking included. The line is written before the guest's connections
   * close, so a connection that ends can be told from QEMU ending.
   */
  #watch(monitor: Socket): void {
    monitor.setEncoding('utf8')
    // Written, not ended: QEMU drops a monitor whose client has closed its end.
    monitor.write('{"execute":"qmp_capabilities"}\n')
    let buffered = ''
    monitor.on('data', (text: string) => {
      buffered += text
      for (let newline; (newline = buffered.indexOf('\n')) !== -1; buffered = buffered.slice(newline + 1)) {
        const line = buffered.slice(0, newline)
        if (!line.includes('"SHUTDOWN"')) continue
        try {
          const message = JSON.parse(line) as { event?: string; data?: { reason?: string } }
          if (message.event !== 'SHUTDOWN') continue
          this.#shutdown = message.data?.reason ?? 'unknown'
          this.#log.debug({ reason: this.#shutdown }, 'QEMU is shutting down')
        } catch {
          // not QMP: nothing to learn from it
        }
      }
    })
  }

  #exitReason({ exitCode, signal }: ExitStatus): VmcgiError {
    // QEMU says why it refused to start (too many CPUs, too much memory) on its last stderr line;
    // why its guest ended, in its SHUTDOWN event.
    const said = this.#stderr.text().trim().split('\n').at(-1) || guestEnded[this.#shutdown ?? '']
    return new VmcgiError('VM_EXITED', `QEMU exited (${signal ?? `status ${exitCode}`})${said ? `: ${said}` : ''}`)
  }
}

/** SHUTDOWN reasons that are the guest's doing (QEMU's ShutdownCause), as the exit's message says them. */
const guestEnded: Record<string, string> = {
  'guest-shutdown': 'the guest powered off',
  'guest-reset': 'the guest rebooted',
  'guest-panic': 'the guest panicked',
}
