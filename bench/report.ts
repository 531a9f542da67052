// What the bench prints and writes: the table of cases, the targets (ratios
// of cases measured in the same run), memory, where the time went, and the
// same as JSON in bench/out/.

import { mkdirSync, writeFileSync } from 'node:fs'
import { availableParallelism, cpus, totalmem } from 'node:os'
import { join } from 'node:path'
import { repo } from '../test/support/vmcgi.js'
import type { Guest } from './guests.js'
import type { Breakdown } from './vmcgi.js'

export interface CaseResult {
  name: string
  /** Latency samples taken. */
  samples: number
  p50: number
  p95: number
  /** req/s by concurrency. */
  rps: Record<number, number>
  failures: number
  cpuPerVm?: number
  /** Where the latency samples' time went, from vmcgi's log (vmcgi cases). */
  breakdown?: Breakdown
}

/** A case that was not measured: skipped (why) or failed (its error). */
export interface CaseMissing {
  name: string
  skipped?: string
  error?: string
}

export interface Memory {
  rssMiB: number
  pssMiB: number
}

export interface RunReport {
  results: CaseResult[]
  missing: CaseMissing[]
  defaultGuest: Guest
  imageGuest?: Guest
  memory: { direct?: Memory; clone?: Memory; imageBooted?: Memory; imageClone?: Memory }
  settings: Record<string, unknown>
  leftover: string[]
  totalSeconds: number
}

interface Target {
  target: string
  /** The cases the ratio needs; a missing one skips the row. */
  needs: string[]
  ratio: (by: Record<string, CaseResult>) => number
  limit: number
  atMost: boolean
}

const cores = availableParallelism()
const capacityOf = (by: Record<string, CaseResult>) => cores / (by.cold?.cpuPerVm ?? Number.NaN)

const targets: Target[] = [
  { target: 'cold p50 ≤ 1.05 × baseline p50', needs: ['cold', 'baseline'], ratio: (by) => by.cold!.p50 / by.baseline!.p50, limit: 1.05, atMost: true },
  { target: 'pool p50 ≤ 1.2 × direct p50', needs: ['pool', 'direct'], ratio: (by) => by.pool!.p50 / by.direct!.p50, limit: 1.2, atMost: true },
  { target: 'clone p50 ≤ 0.25 × baseline p50', needs: ['clone', 'baseline'], ratio: (by) => by.clone!.p50 / by.baseline!.p50, limit: 0.25, atMost: true },
  {
    target: 'cold req/s at c=4 ≥ 0.8 × boot capacity (cores ÷ CPU-s per VM)', needs: ['cold'],
    ratio: (by) => by.cold!.rps[4]! / capacityOf(by), limit: 0.8, atMost: false,
  },
  { target: 'pool+clone p50 ≤ 1.5 × direct p50', needs: ['pool+clone', 'direct'], ratio: (by) => by['pool+clone']!.p50 / by.direct!.p50, limit: 1.5, atMost: true },
  {
    target: 'pool+clone req/s at c=4 ≥ clone req/s at c=4', needs: ['pool+clone', 'clone'],
    ratio: (by) => by['pool+clone']!.rps[4]! / by.clone!.rps[4]!, limit: 1, atMost: false,
  },
  { target: 'pool+clone p50 ≤ 0.05 × container p50', needs: ['pool+clone', 'container'], ratio: (by) => by['pool+clone']!.p50 / by.container!.p50, limit: 0.05, atMost: true },
  { target: 'clone p50 ≤ 0.5 × container p50', needs: ['clone', 'container'], ratio: (by) => by.clone!.p50 / by.container!.p50, limit: 0.5, atMost: true },
  { target: 'image clone p50 ≤ 0.1 × image cold p50', needs: ['image clone', 'image cold'], ratio: (by) => by['image clone']!.p50 / by['image cold']!.p50, limit: 0.1, atMost: true },
]

const fmt = (value: number | undefined, digits = 0) => (value === undefined || Number.isNaN(value) ? '-' : value.toFixed(digits))
const fmtMemory = (memory: Memory | undefined) => (memory ? `RSS ${fmt(memory.rssMiB)} MiB (PSS ${fmt(memory.pssMiB)})` : 'not measured')

export function report(run: RunReport): void {
  const by = Object.fromEntries(run.results.map((result) => [result.name, result])) as Record<string, CaseResult>
  const lines = [
    '| case | samples | p50 ms | p95 ms | req/s c=1 | req/s c=2 | req/s c=4 | CPU-s per VM | failures |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ...run.results.map((r) => `| ${r.name} | ${r.samples} | ${fmt(r.p50)} | ${fmt(r.p95)} | ${fmt(r.rps[1], 2)} | ${fmt(r.rps[2], 2)} | ${fmt(r.rps[4], 2)} | ${fmt(r.cpuPerVm, 2)} | ${r.failures} |`),
  ]
  const missingLines = run.missing.map((m) => (m.skipped ? `${m.name}: skipped, ${m.skipped}` : `${m.name}: FAILED, ${m.error}`))

  const measured = targets.map((t) => {
    const absent = t.needs.find((name) => by[name] === undefined)
    if (absent !== undefined) return { target: t.target, limit: t.limit, atMost: t.atMost, ratio: null, met: `no ${absent} case` }
    const ratio = t.ratio(by)
    const met = Number.isNaN(ratio) ? 'not measured' : (t.atMost ? ratio <= t.limit : ratio >= t.limit) ? 'yes' : 'no'
    return { target: t.target, limit: t.limit, atMost: t.atMost, ratio, met }
  })
  const targetLines = [
    '| target | measured | met |',
    '| --- | --- | --- |',
    ...measured.map((t) => `| ${t.target} | ${t.ratio === null ? '-' : fmt(t.ratio, 2)} | ${t.met} |`),
  ]

  const memoryLines = [
    `memory per VM, idle and ready: default guest booted ${fmtMemory(run.memory.direct)}, clone ${fmtMemory(run.memory.clone)}`,
    `  Python image: booted (pooled, after its warm-up) ${fmtMemory(run.memory.imageBooted)}, clone (pooled) ${fmtMemory(run.memory.imageClone)}`,
  ]
  const breakdownLines = run.results.filter((r) => r.breakdown && r.breakdown.vms > 0).map((r) => {
    const b = r.breakdown!
    const phases = Object.entries(b.phases).map(([phase, ms]) => `${phase} ${fmt(ms)}`).join(', ')
    return `  ${r.name}: request ${fmt(b.requestMs)} ms in vmcgi, its VM's start ${fmt(b.bootMs)} ms; VM start phases (ms since begun): ${phases} (medians of ${b.vms} VMs)`
  })
  const silentLine = `a guest that prints no ready line: silent p50 / cold p50 = ${fmt(by.silent?.p50)} / ${fmt(by.cold?.p50)} = ${fmt((by.silent?.p50 ?? Number.NaN) / (by.cold?.p50 ?? Number.NaN), 2)}`
  const machine = `${cpus()[0]?.model ?? 'unknown CPU'}, ${cores} cores, ${Math.round(totalmem() / 2 ** 30)} GiB`
  const guests = [run.defaultGuest, ...(run.imageGuest ? [run.imageGuest] : [])]
  const header = `vmcgi bench: ${machine}; ${guests.map((g) => `${g.config.vm.qemu.split('/').pop()} ${g.qemuVersion}, ${g.accel.accel} (${g.accel.reason})`).join('; ')}`
  const minutes = `${Math.floor(run.totalSeconds / 60)} min ${Math.round(run.totalSeconds % 60)} s`

  console.log([
    header, '',
    ...lines, ...(missingLines.length ? ['', ...missingLines] : []), '',
    ...targetLines, '',
    ...memoryLines,
    `boot capacity: ${fmt(capacityOf(by), 2)} VMs/s`,
    silentLine,
    'where the latency samples\' time went (vmcgi\'s log):',
    ...breakdownLines,
    ...(run.leftover.length ? [`LEFT RUNNING (killed now): ${run.leftover.join('; ')}`] : []),
    '',
    `total: ${minutes}`,
  ].join('\n'))

  const outDir = join(repo, 'bench/out')
  mkdirSync(outDir, { recursive: true })
  const file = join(outDir, `bench-${new Date().toISOString().replaceAll(':', '-')}.json`)
  const guestJson = (g: Guest) => ({ qemu: { binary: g.config.vm.qemu, version: g.qemuVersion }, accel: g.accel, memoryMiB: g.config.vm.memoryMiB })
  writeFileSync(file, JSON.stringify({
    date: new Date().toISOString(),
    machine: { cpu: cpus()[0]?.model, cores, memoryGiB: totalmem() / 2 ** 30, platform: process.platform, arch: process.arch },
    // As before: the default guest's QEMU and accelerator.
    qemu: guestJson(run.defaultGuest).qemu,
    accel: run.defaultGuest.accel,
    guests: { default: guestJson(run.defaultGuest), image: run.imageGuest ? guestJson(run.imageGuest) : null },
    settings: run.settings,
    results: run.results,
    missing: run.missing,
    targets: measured,
    memory: run.memory,
    leftover: run.leftover,
    totalSeconds: run.totalSeconds,
  }, null, 2))
  console.log(`written: ${file}`)
}
