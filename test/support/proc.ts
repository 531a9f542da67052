// What a running process holds and uses, read from /proc (Linux only): descriptors, TCP listeners, children, memory, CPU time.

import { execFileSync } from 'node:child_process'
import { readdir, readFile, readlink } from 'node:fs/promises'

interface Stat {
  pid: number
  /** The kernel's name for the process, cut to 15 characters. */
  comm: string
  /** R, S, D, Z (zombie), …; '?' when unreadable. */
  state: string
  ppid: number
  /** The fields after "pid (comm) ": state is [0], ppid [1], utime [11]. */
  fields: string[]
}

/** /proc/pid/stat, or undefined once the process is gone. */
async function readStat(pid: number): Promise<Stat | undefined> {
  const text = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined)
  if (text === undefined) return undefined
  // pid (comm) state ppid ...: comm may hold spaces and parentheses.
  const fields = text.slice(text.lastIndexOf(')') + 2).trimEnd().split(' ')
  return { pid, comm: text.slice(text.indexOf('(') + 1, text.lastIndexOf(')')), state: fields[0] ?? '?', ppid: Number(fields[1]), fields }
}

/** Every process on the machine, zombies included. */
async function readAllStats(): Promise<Stat[]> {
  const pids = (await readdir('/proc')).filter((entry) => /^\d+$/.test(entry)).map(Number)
  const stats = await Promise.all(pids.map(readStat))
  return stats.filter((stat) => stat !== undefined)
}

/** argv of `pid`; empty for a zombie, a kernel thread or a process that is gone. */
async function readArgv(pid: number): Promise<string[]> {
  return (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0').filter(Boolean)
}

/** The command line as ps and pgrep show it: argv, or [comm] when there is none. */
function commandOf(stat: Stat, argv: string[]): string {
  return argv.length > 0 ? argv.join(' ') : `[${stat.comm}]`
}

/** Open file descriptors of `pid`. */
export async function fdCount(pid: number): Promise<number> {
  return (await readdir(`/proc/${pid}/fd`)).length
}

/** The TCP addresses a process listens on (ip:port). */
export async function listeningAddresses(pid: number): Promise<string[]> {
  const inodes = new Set<string>()
  for (const fd of await readdir(`/proc/${pid}/fd`)) {
    const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')
    const match = /^socket:\[(\d+)\]$/.exec(target)
    if (match) inodes.add(match[1]!)
  }
  const listening: string[] = []
  for (const table of ['tcp', 'tcp6']) {
    const text = await readFile(`/proc/net/${table}`, 'utf8').catch(() => '')
    for (const line of text.split('\n').slice(1)) {
      const fields = line.trim().split(/\s+/)
      // local address, state 0A = LISTEN, inode
      if (fields[3] !== '0A' || !inodes.has(fields[9]!)) continue
      const [hexIp, hexPort] = fields[1]!.split(':') as [string, string]
      const ip = hexIp.length === 8
        ? Buffer.from(hexIp, 'hex').reverse().join('.')
        : `[${hexIp}]`
      listening.push(`${ip}:${parseInt(hexPort, 16)}`)
    }
  }
  return listening
}

/** Every process whose parent is `pid`, zombies included. */
export async function childPids(pid: number): Promise<number[]> {
  const children = (await readAllStats()).filter((stat) => stat.ppid === pid).map((stat) => stat.pid)
  return children.sort((a, b) => a - b)
}

/** The start of `pid`'s stat line after its name (state, parent, …), or 'gone'. */
export async function processState(pid: number): Promise<string> {
  const text = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined)
  return text?.split(') ')[1]?.slice(0, 20) ?? 'gone'
}

/** Resident set size of `pid`, in MiB (VmRSS in /proc/pid/status). */
export async function rssMiB(pid: number): Promise<number> {
  return kibIn(`/proc/${pid}/status`, 'VmRSS').then((kib) => kib / 1024)
}

/** Resident and proportional set size of `pid`, in MiB (PSS counts shared pages once, split among their users). */
export async function memoryOf(pid: number): Promise<{ rssMiB: number; pssMiB: number }> {
  const [rss, pss] = await Promise.all([kibIn(`/proc/${pid}/status`, 'VmRSS'), kibIn(`/proc/${pid}/smaps_rollup`, 'Pss')])
  return { rssMiB: rss / 1024, pssMiB: pss / 1024 }
}

async function kibIn(file: string, key: string): Promise<number> {
  const match = new RegExp(`^${key}:\\s+(\\d+)\\s+kB$`, 'm').exec(await readFile(file, 'utf8'))
  if (!match) throw new Error(`no ${key} in ${file}`)
  return Number(match[1])
}

let clockTicks: number | undefined

/** CPU seconds (user + system) used by `pid` itself and by its children it has reaped. */
export async function cpuSeconds(pid: number): Promise<{ self: number; children: number }> {
  const stat = await readStat(pid)
  if (!stat) throw new Error(`no /proc/${pid}/stat`)
  clockTicks ??= Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim())
  const seconds = (index: number) => Number(stat.fields[index]) / clockTicks!
  // utime, stime, cutime, cstime: fields 14 to 17 of stat, 11 to 14 after "pid (comm) ".
  return { self: seconds(11) + seconds(12), children: seconds(13) + seconds(14) }
}

export interface ProcSample {
  fds: number
  listeners: string[]
  children: number[]
  rssMiB: number
}

/** Descriptors, sorted listeners, children and RSS of `pid`, read at once. */
export async function sampleProcess(pid: number): Promise<ProcSample> {
  const [fds, listeners, children, rss] = await Promise.all([fdCount(pid), listeningAddresses(pid), childPids(pid), rssMiB(pid)])
  return { fds, listeners: listeners.sort(), children, rssMiB: rss }
}

export interface QemuProcess {
  pid: number
  ppid: number
  state: string
  /** QEMU's -name, which vmcgi sets to the VM's id. */
  name: string | undefined
  command: string
}

/** Every qemu-system process on the machine (as `pgrep qemu-system` finds them), zombies included, with its parent and -name. */
export async function qemuProcesses(): Promise<QemuProcess[]> {
  const qemus = (await readAllStats()).filter((stat) => stat.comm.includes('qemu-system'))
  return Promise.all(qemus.map(async (stat) => {
    const argv = await readArgv(stat.pid)
    const nameAt = argv.indexOf('-name')
    return { pid: stat.pid, ppid: stat.ppid, state: stat.state, name: nameAt === -1 ? undefined : argv[nameAt + 1], command: commandOf(stat, argv) }
  }))
}

/** Children of `pid` whose command line names qemu-system (as `pgrep -P pid -f qemu-system` finds them), zombies included. */
export async function qemuChildren(pid: number): Promise<number[]> {
  const children = (await readAllStats()).filter((stat) => stat.ppid === pid)
  const found: number[] = []
  for (const stat of children) {
    if (commandOf(stat, await readArgv(stat.pid)).includes('qemu-system')) found.push(stat.pid)
  }
  return found.sort((a, b) => a - b)
}
