// Waits until the HTTP server inside a guest answers.
//
// QEMU's user networking accepts a TCP connection on the forwarded port as soon
// as QEMU starts, long before the guest listens, so a connect proves nothing:
// only an HTTP status line does. A probe sent before the guest's network is up
// is not refused either; its SYN toward the guest is lost and retried on slow
// timers. So attempts are short and overlap, a new one starting every interval,
// and the guest's console line (when seen) starts one at once.
//
// A guest that listens can still be slow to answer: its first request runs
// code that emulation has not translated yet, and a busy host shares its cores
// among many guests. Attempts that always gave up after attemptTimeoutMs would
// then never see an answer, so each attempt may last at least half as long as
// the wait so far, and the attempt the console line starts waits for its
// answer as long as the caller's signal allows.
//
// Once the console line is seen, the overlapping attempts stop and those in
// flight are dropped: from then on one attempt at a time, a new one when the
// last ended unanswered or has waited patienceMs, then twice that, and so on
// (the waiting one stays open: it may still be answered). A guest that
// listens with a small backlog (Python's socketserver takes 5) would
// otherwise find it full of abandoned probes, drop the SYN of the request
// itself, and have it retried by slirp seconds later; a clone template saved
// then would keep that backlog full in every clone. But one attempt alone is
// not enough either. slirp must learn a guest's MAC address by ARP before it
// can deliver a SYN to it; a guest that has sent nothing yet gets asked, and
// the SYN waits for slirp's next poll, and is dropped if that comes more than
// a second later, then sent again by slirp's TCP 6 s later. Measured with the
// default guest before its init announced itself: 7 of 20 cold boots took
// 6 s more with one attempt, 5 of 20 took 1 s more with a second one after
// 1 s, and with a second one after 250 ms some took 250 ms more, none longer.

import { readFileSync, readdirSync, readlinkSync } from 'node:fs'
import { connect, type Socket } from 'node:net'
import { groupMembers } from './process-group.js'

export interface ReadinessOptions {
  host: string
  port: number
  path: string
  intervalMs: number
  attemptTimeoutMs: number
  signal: AbortSignal
  /** Resolves when the guest says on its console that it is ready. */
  consoleReady?: Promise<void>
}

/**
 * How many attempts younger than attemptTimeoutMs may be in flight at once,
 * and how many in all (older ones wait longer, see above); more only loads slirp.
 */
const maxYoung = 8
const maxOpen = 32
/** After the console line: how long an unanswered attempt waits before another joins it, at first, and how many may be open. */
const patienceMs = 250
const maxPatient = 4

/**
 * Resolves at the first HTTP answer. Rejects only with the signal's reason:
 * the caller owns the deadline (AbortSignal.timeout or its own controller).
 */
export function waitUntilReady(options: ReadinessOptions): Promise<void> {
  const { host, port, path, intervalMs, attemptTimeoutMs, signal } = options
  signal.throwIfAborted()
  return new Promise((resolve, reject) => {
    /** Open probes, and when each started. */
    const sockets = new Map<Socket, number>()
    let settled = false

    const settle = (error?: unknown) => {
      if (settled) return
      settled = true
      clearInterval(timer)
      clearTimeout(retry)
      signal.removeEventListener('abort', onAbort)
      for (const socket of sockets.keys()) socket.destroy()
      if (error === undefined) resolve()
      else reject(error)
    }
    const onAbort = () => settle(signal.reason)

    const started = performance.now()
    const young = (now: number) => [...sockets.values()].filter((since) => now - since < attemptTimeoutMs).length
    let retry: NodeJS.Timeout | undefined
    let patience = patienceMs
    /**
     * One probe. `patient` ones have no time limit of their own: another
     * joins one left unanswered for `patience` (doubled each time), and one
     * is made again when the last closed unanswered.
     */
    const attempt = (patient = false) => {
      const now = performance.now()
      if (settled || (!patient && (sockets.size >= maxOpen || young(now) >= maxYoung))) return
      const socket = connect({ host, port })
      sockets.set(socket, patient ? -Infinity : now)
      if (!patient) socket.setTimeout(Math.max(attemptTimeoutMs, (now - started) / 2), () => socket.destroy())
      else {
        const overdue = setTimeout(() => {
          if (settled || !sockets.has(socket) || sockets.size >= maxPatient) return
          patience *= 2
          attempt(true)
        }, patience)
        socket.once('close', () => clearTimeout(overdue))
      }
      socket.once('connect', () => socket.write(`GET ${path} HTTP/1.0\r\nHost: ${host}:${port}\r\n\r\n`))
      socket.once('data', (chunk: Buffer) => {
        if (chunk.subarray(0, 5).toString('latin1') === 'HTTP/') settle()
        else socket.destroy()
      })
      socket.on('error', () => {})
      socket.once('close', () => {
        sockets.delete(socket)
        if (patient && !settled && sockets.size === 0) retry = setTimeout(() => attempt(true), intervalMs)
      })
    }

    signal.addEventListener('abort', onAbort, { once: true })
    const timer = setInterval(() => attempt(), intervalMs)
    options.consoleReady?.then(() => {
      if (settled) return
      clearInterval(timer)
      for (const socket of sockets.keys()) socket.destroy()
      attempt(true)
    }, () => {})
    attempt()
  })
}

/**
 * Sends `count` requests for `path`, one after another, each read to its end.
 * Under emulation a guest's first requests are slow while QEMU translates the
 * code they run; a pooled VM takes that cost before its client arrives.
 */
export async function warmUp({ host, port, path, count, timeoutMs }: {
  host: string
  port: number
  path: string
  count: number
  timeoutMs: number
}): Promise<void> {
  for (let i = 0; i < count; i++) {
    await new Promise<void>((resolve) => {
      const socket = connect({ host, port })
      socket.setTimeout(timeoutMs, () => socket.destroy())
      socket.once('connect', () => socket.end(`GET ${path} HTTP/1.0\r\nHost: ${host}:${port}\r\n\r\n`))
      socket.on('data', () => {})
      socket.on('error', () => {})
      socket.once('close', () => resolve())
    })
  }
}

/** A socket listening on the forwarded port: descriptor `fd` of process `pid`, linked to `target` (socket:[INODE]). */
export interface Listener {
  pid: number
  fd: string
  target: string
}

/**
 * The descriptor of a process of group `pgid` (its leader first, QEMU itself
 * unless vm.qemu is a wrapper) that listens on 127.0.0.1:`port`, read from
 * /proc (Linux); false when none does, undefined where that cannot be told.
 * Between get-port finding a port free and QEMU binding it, another process
 * may take it, and then a probe would reach that process instead of the guest.
 */
export function findListener(pgid: number, port: number): Listener | false | undefined {
  const leader = listenerOf(pgid, port)
  if (leader) return leader
  // A wrapper that does not exec QEMU: QEMU is another process of the group.
  const others = groupMembers(pgid).filter((member) => member.pid !== pgid).map((member) => listenerOf(member.pid, port))
  const found = others.find((other) => other)
  if (found) return found
  return leader === false || others.includes(false) ? false : undefined
}

/**
 * Whether the process still holds the descriptor found listening: cheap
 * (one readlink; /proc/net/tcp takes milliseconds to read on a host with
 * a large connection table). An exiting process has lost its descriptors
 * before /proc shows it as a zombie.
 */
export function stillHolds({ pid, fd, target }: Listener): boolean {
  try {
    return readlinkSync(`/proc/${pid}/fd/${fd}`) === target
  } catch {
    return false
  }
}

function listenerOf(pid: number, port: number): Listener | false | undefined {
  let table: string
  let fds: string[]
  try {
    table = readFileSync(`/proc/${pid}/net/tcp`, 'latin1')
    fds = readdirSync(`/proc/${pid}/fd`)
  } catch {
    return undefined
  }
  // Lines: sl local_address rem_address st … inode; 0A is LISTEN. The
  // address is printed in the host's byte order.
  const hexPort = port.toString(16).toUpperCase().padStart(4, '0')
  const locals = [`0100007F:${hexPort}`, `7F000001:${hexPort}`]
  const inodes = new Set(table.split('\n').slice(1)
    .map((line) => line.trim().split(/\s+/))
    .filter((fields) => locals.includes(fields[1]!) && fields[3] === '0A')
    .map((fields) => `socket:[${fields[9]}]`))
  if (inodes.size === 0) return false
  let readable = false
  for (const fd of fds) {
    try {
      const target = readlinkSync(`/proc/${pid}/fd/${fd}`)
      readable = true
      if (inodes.has(target)) return { pid, fd, target }
    } catch {
      // closed meanwhile, or not ours to read
    }
  }
  return readable ? false : undefined
}
