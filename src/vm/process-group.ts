// The processes of one process group, read from /proc (Linux): QEMU started through a wrapper script is a process of the group vmcgi spawned, not its leader.

import { readdirSync, readFileSync } from 'node:fs'

export interface GroupMember {
  pid: number
  /** R, S, D, Z (zombie), T (stopped), …, as /proc/PID/stat says. */
  state: string
}

/** /proc/PID/stat's state and process group, or undefined once the process is gone. */
export function readStat(pid: number): { state: string; pgrp: number } | undefined {
  let stat: string
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'latin1')
  } catch {
    return undefined
  }
  // pid (comm) state ppid pgrp …: comm may hold spaces and parentheses, the fields follow the last ')'.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  return { state: fields[0] ?? '?', pgrp: Number(fields[2]) }
}

/** Every process of group `pgid`, zombies included; [] where /proc cannot be read. */
export function groupMembers(pgid: number): GroupMember[] {
  let entries: string[]
  try {
    entries = readdirSync('/proc')
  } catch {
    return []
  }
  const members: GroupMember[] = []
  for (const entry of entries) {
    if (!/^\d+$/.test(entry)) continue
    const stat = readStat(Number(entry))
    if (stat?.pgrp === pgid) members.push({ pid: Number(entry), state: stat.state })
  }
  return members
}

/** Z and X: dead, not yet reaped; T: stopped by a signal (SIGSTOP), and answering nothing. */
export function isLive(state: string): boolean {
  return !['Z', 'X', 'T'].includes(state)
}

/**
 * Sends `signal` to every process of group `pgid`. A group's id stays taken while
 * any of its processes lives, so this reaches no other process while it has one.
 */
export function signalGroup(pgid: number, signal: NodeJS.Signals): 'sent' | 'none' | 'refused' {
  try {
    process.kill(-pgid, signal)
    return 'sent'
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'ESRCH' ? 'none' : 'refused'
  }
}
