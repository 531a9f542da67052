// What a running process holds, read from /proc: open descriptors, TCP
// listeners, child processes and resident memory. Linux only.

import { readdir, readFile } from 'node:fs/promises'
import { listeningAddresses } from '../e2e/harness.js'

export interface ProcSample {
  fds: number
  listeners: string[]
  children: number[]
  rssMiB: number
}

/** Open file descriptors of `pid`. */
export async function fdCount(pid: number): Promise<number> {
  return (await readdir(`/proc/${pid}/fd`)).length
}

/** Resident set size of `pid`, in MiB (VmRSS in /proc/pid/status). */
export async function rssMiB(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8')
  const match = /^VmRSS:\s+(\d+)\s+kB$/m.exec(status)
  if (!match) throw new Error(`no VmRSS in /proc/${pid}/status`)
  return Number(match[1]) / 1024
}

/** Every process whose parent is `pid`, zombies included. */
export async function childPids(pid: number): Promise<number[]> {
  const children: number[] = []
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    const stat = await readFile(`/proc/${entry}/stat`, 'utf8').catch(() => '')
    // pid (comm) state ppid ...: comm may hold spaces and parentheses.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    if (Number(fields[1]) === pid) children.push(Number(entry))
  }
  return children.sort((a, b) => a - b)
}

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

/** Every qemu-system process on the machine, zombies included, with its parent and -name. */
export async function qemuProcesses(): Promise<QemuProcess[]> {
  const found: QemuProcess[] = []
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    const stat = await readFile(`/proc/${entry}/stat`, 'utf8').catch(() => '')
    const comm = stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'))
    if (!comm.startsWith('qemu-system')) continue
    const [state = '?', ppid = '0'] = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    const argv = (await readFile(`/proc/${entry}/cmdline`, 'utf8').catch(() => '')).split('\0').filter(Boolean)
    const nameAt = argv.indexOf('-name')
    found.push({
      pid: Number(entry),
      ppid: Number(ppid),
      state,
      name: nameAt === -1 ? undefined : argv[nameAt + 1],
      command: argv.length > 0 ? argv.join(' ').slice(0, 160) : `[${comm}]`,
    })
  }
  return found
}
