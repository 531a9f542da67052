// vmcgi itself, as the bench runs it: the real CLI (dist/main.js) with a
// guest's config and the bench's overrides; one request, closed-loop load,
// the pool's level, and where a VM's start went (its "VM booted" log line).

import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { request } from 'undici'
import { cpuSeconds } from '../test/support/proc.js'
import { spawnVmcgi, type LogLine, type VmcgiProcess } from '../test/support/vmcgi.js'
import type { Guest, RawConfig } from './guests.js'
import { closedLoop, dispatcher, get, median } from './measure.js'

export interface Vmcgi extends VmcgiProcess {
  /** The admin listener, for /metrics. */
  admin: string
}

/** A QEMU outlived its vmcgi: it would skew every case after it, so the run stops. */
export class LeakError extends Error {}

let configs = 0
const running = new Set<VmcgiProcess>()
/** The pids of every vmcgi started, and the ids (QEMU's -name) of every VM they logged. */
export const started = { pids: new Set<number>(), vmIds: new Set<string>() }

/**
 * Starts vmcgi with `guest`'s config, the bench's limits and `overrides`
 * (merged one level down: `{ readiness: { consoleLine: '' } }` keeps the
 * guest's readiness path); resolves once both listeners are up. Logs at
 * debug, for the "VM booted" lines.
 */
export async function startVmcgi(guest: Guest, overrides: RawConfig, dir: string): Promise<Vmcgi> {
  const merged: RawConfig = { ...guest.raw }
  for (const [key, value] of Object.entries(overrides)) merged[key] = { ...guest.raw[key], ...value }
  const file = join(dir, `config-${++configs}.json`)
  writeFileSync(file, JSON.stringify({
    ...merged,
    log: { level: 'debug' },
    admin: { port: 0 },
    limits: { maxVms: 8, queue: { size: 64, maxWaitMs: 60_000 } },
  }))
  // Clone mode boots and saves its template before it listens, which takes a while under TCG.
  const vmcgi = await spawnVmcgi(file, { stderr: 'inherit', listenTimeoutMs: 180_000 })
  running.add(vmcgi)
  started.pids.add(vmcgi.child.pid!)
  try {
    return { ...vmcgi, admin: await vmcgi.adminUrl() }
  } catch (error) {
    await stopVmcgi(vmcgi)
    throw error
  }
}

/** Stops vmcgi; a QEMU that outlives it fails the run (LeakError). */
export async function stopVmcgi(vmcgi: VmcgiProcess): Promise<void> {
  const outlived = await vmcgi.stop()
  running.delete(vmcgi)
  for (const line of vmcgi.logLines()) if (typeof line.vm === 'string') started.vmIds.add(line.vm)
  if (outlived.length > 0) throw new LeakError(`QEMU outlived vmcgi: ${outlived.join(', ')}`)
}

/** Stops every vmcgi still running, and says which QEMU outlived one. */
export async function stopAllVmcgi(): Promise<string[]> {
  const outlived: string[] = []
  for (const vmcgi of [...running]) {
    try {
      await stopVmcgi(vmcgi)
    } catch (error) {
      outlived.push(String((error as Error).message))
    }
  }
  return outlived
}

/** Runs `use` on a vmcgi started as startVmcgi does, and stops it however `use` ends. */
export async function withVmcgi<T>(guest: Guest, overrides: RawConfig, dir: string, use: (vmcgi: Vmcgi) => Promise<T>): Promise<T> {
  const vmcgi = await startVmcgi(guest, overrides, dir)
  let result: T
  try {
    result = await use(vmcgi)
  } catch (error) {
    // The case's own error is the one to report, unless a QEMU outlived vmcgi.
    await stopVmcgi(vmcgi).catch((stopError: unknown) => {
      if (stopError instanceof LeakError) throw stopError
    })
    throw error
  }
  await stopVmcgi(vmcgi)
  return result
}

/** Waits until the pool holds `size` VMs, as /metrics says. */
export async function waitForPool(vmcgi: Vmcgi, size: number, timeoutMs = 60_000): Promise<void> {
  const end = performance.now() + timeoutMs
  while (performance.now() < end) {
    const res = await request(`${vmcgi.admin}/metrics`, { dispatcher, signal: AbortSignal.timeout(5_000) })
    const pooled = Number(/^vmcgi_vms\{state="pooled"\} (\d+)/m.exec(await res.body.text())?.[1] ?? 0)
    if (pooled >= size) return
    await sleep(20)
  }
  throw new Error(`the pool did not fill within ${timeoutMs / 1000} s`)
}

/** One request through vmcgi, timed; anything but 200 with vmcgi-status OK throws. */
export async function vmcgiOnce(vmcgi: Vmcgi, path = '/', timeoutMs = 30_000): Promise<number> {
  const begun = performance.now()
  const answer = await get(`${vmcgi.url}${path}`, timeoutMs)
  if (answer.status !== 200 || answer.vmcgiStatus !== 'OK') throw new Error(`vmcgi answered ${answer.status} ${answer.vmcgiStatus}`)
  return performance.now() - begun
}

export interface ThroughputPoint {
  rps: number
  ok: number
  failed: number
  why: string[]
  /** CPU time of vmcgi and its reaped QEMUs per request answered. */
  cpuPerVm: number
}

/** Closed-loop load through vmcgi: `concurrency` clients for `seconds`. */
export async function throughput(vmcgi: Vmcgi, concurrency: number, seconds: number, path = '/', timeoutMs = 30_000): Promise<ThroughputPoint> {
  const before = await cpuSeconds(vmcgi.child.pid!)
  const load = await closedLoop(concurrency, seconds, async () => {
    const answer = await get(`${vmcgi.url}${path}`, timeoutMs)
    return answer.status === 200 ? undefined : `${answer.status} ${answer.vmcgiStatus}`
  })
  await sleep(1_500) // let the last VMs be reaped, so their CPU time is counted
  const after = await cpuSeconds(vmcgi.child.pid!)
  const cpu = after.self - before.self + after.children - before.children
  return { rps: load.rps, ok: load.ok, failed: load.failed, why: load.why, cpuPerVm: load.ok ? cpu / load.ok : Number.NaN }
}

/** Medians, in ms, of where the requests of some log lines went. */
export interface Breakdown {
  /** VMs started ("VM booted" lines of mode boot or clone, the template's and the preflight's left out). */
  vms: number
  /** Per phase of a VM's start, since vmcgi began it: spawned, restored, reseeded, answered. */
  phases: Record<string, number>
  /** From the request log lines: the request's whole time in vmcgi, and its VM's start (bootMs). */
  requestMs: number
  bootMs: number
}

/** Where the time of the requests in `lines` (a slice of vmcgi's log) went. */
export function breakdown(lines: LogLine[]): Breakdown {
  const booted = lines.filter((line) => line.msg === 'VM booted' && (line.mode === 'boot' || line.mode === 'clone'))
  const phases: Record<string, number> = {}
  for (const phase of ['spawned', 'restored', 'reseeded', 'answered']) {
    const values = booted.map((line) => (line.phases as Record<string, number> | undefined)?.[phase]).filter((value) => typeof value === 'number')
    if (values.length) phases[phase] = median(values)
  }
  const requests = lines.filter((line) => line.msg === 'request' && typeof line.vm === 'string')
  return {
    vms: booted.length,
    phases,
    requestMs: median(requests.map((line) => Number(line.ms))),
    bootMs: median(requests.map((line) => Number(line.bootMs)).filter((value) => !Number.isNaN(value))),
  }
}
