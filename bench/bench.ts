// npm run bench: vmcgi against a bare QEMU boot of the same guest, side by
// side in one run, on this machine. Prints a table and writes JSON.
//
// Cases:
//   baseline  spawn the QEMU command vmcgi would, poll GET / until 200, kill it
//   cold      vmcgi, every request boots its own VM
//   pool      vmcgi with pool.size VMs booted ahead
//   clone     vmcgi restoring a copy-on-write clone of a saved template
//   direct    GET / to one guest that is already up: the floor
//   silent    as cold, but vmcgi ignores the guest's ready line: a guest that
//             prints nothing, served by HTTP probing alone (latency only)
//
// Every loop is bounded in count and time; every QEMU started here is killed.

import { execFileSync, spawn, type ChildProcess } from 'node:child_process'
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { availableParallelism, cpus, tmpdir, totalmem } from 'node:os'
import { join } from 'node:path'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import getPort from 'get-port'
import { Agent, request } from 'undici'
import { normalizeConfig, type Config } from '../src/config.js'
import { chooseAccel, guestArchOf, readHostFacts } from '../src/vm/accel.js'
import { buildQemuArgs } from '../src/vm/qemu-args.js'
import { cpuSeconds, memoryOf } from '../test/support/proc.js'
import { repo, spawnVmcgi, type VmcgiProcess } from '../test/support/vmcgi.js'

const samples = Number(process.env.BENCH_SAMPLES ?? 15)
const throughputSeconds = Number(process.env.BENCH_SECONDS ?? 12)
const concurrencies = [1, 2, 4]

const rawConfig = JSON.parse(readFileSync(join(repo, 'config.example.json'), 'utf8')) as Record<string, Record<string, unknown>>
const config: Config = normalizeConfig(rawConfig, { baseDir: repo })
const accel = chooseAccel(config.vm.accel, guestArchOf(config.vm.qemu), readHostFacts())
const dispatcher = new Agent({ keepAliveTimeout: 1_000, headersTimeout: 30_000, bodyTimeout: 30_000 })

// ---------------------------------------------------------------- measuring

function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b)
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? Number.NaN
}

async function get(url: string, timeoutMs = 30_000): Promise<{ status: number; vmcgiStatus: string | undefined }> {
  const res = await request(url, { dispatcher, signal: AbortSignal.timeout(timeoutMs) })
  await res.body.dump()
  return { status: res.statusCode, vmcgiStatus: res.headers['vmcgi-status'] as string | undefined }
}

// ---------------------------------------------------------------- bare QEMU

interface BareVm {
  child: ChildProcess
  port: number
  exited: Promise<void>
}

async function spawnBare(): Promise<BareVm> {
  const port = await getPort({ host: '127.0.0.1' })
  const args = buildQemuArgs({ vm: config.vm, accel: accel.accel, hostPort: port, sandbox: true, name: 'bench' })
  const child = spawn(config.vm.qemu, args, { stdio: ['pipe', 'ignore', 'ignore'] })
  const exited = new Promise<void>((done) => child.once('exit', () => done()))
  return { child, port, exited }
}

/** What a shell loop of `curl --max-time 0.1` does, without a process per try. */
async function pollUntil200(port: number, deadlineMs = 20_000): Promise<void> {
  const end = performance.now() + deadlineMs
  while (performance.now() < end) {
    try {
      if ((await get(`http://127.0.0.1:${port}/`, 100)).status === 200) return
    } catch {
      // not up yet
    }
  }
  throw new Error('the bare guest did not answer within 20 s')
}

async function killBare(vm: BareVm): Promise<void> {
  vm.child.kill('SIGKILL')
  await vm.exited
}

async function baselineOnce(): Promise<number> {
  const started = performance.now()
  const vm = await spawnBare()
  try {
    await pollUntil200(vm.port)
    return performance.now() - started
  } finally {
    await killBare(vm)
  }
}

// ---------------------------------------------------------------- vmcgi

interface Vmcgi extends VmcgiProcess {
  /** The admin listener, for /metrics. */
  admin: string
}

let configs = 0

/** Starts vmcgi with config.example.json, the bench's limits and `overrides`; resolves once both listeners are up. */
async function startVmcgi(overrides: Record<string, Record<string, unknown>>, dir: string): Promise<Vmcgi> {
  const file = join(dir, `config-${++configs}.json`)
  writeFileSync(file, JSON.stringify({
    ...rawConfig,
    ...overrides,
    log: { level: 'info' },
    admin: { port: 0 },
    limits: { maxVms: 8, queue: { size: 64, maxWaitMs: 60_000 } },
    vm: { ...rawConfig.vm, kernel: config.vm.kernel, initrd: config.vm.initrd, ...overrides.vm },
  }))
  // Clone mode boots and saves its template before it listens, which takes a while under TCG.
  const vmcgi = await spawnVmcgi(file, { stderr: 'inherit', listenTimeoutMs: 180_000 })
  try {
    return { ...vmcgi, admin: await vmcgi.adminUrl() }
  } catch (error) {
    await stopVmcgi(vmcgi)
    throw error
  }
}

/** Stops vmcgi; a QEMU that outlives it would skew the cases after it, so that fails the run. */
async function stopVmcgi(vmcgi: VmcgiProcess): Promise<void> {
  const outlived = await vmcgi.stop()
  if (outlived.length > 0) throw new Error(`QEMU outlived vmcgi: ${outlived.join(', ')}`)
}

/** Waits until the pool is full again, as /metrics says. */
async function waitForPool(vmcgi: Vmcgi, size: number): Promise<void> {
  const end = performance.now() + 30_000
  while (performance.now() < end) {
    const res = await request(`${vmcgi.admin}/metrics`, { dispatcher })
    const pooled = Number(/^vmcgi_vms\{state="pooled"\} (\d+)/m.exec(await res.body.text())?.[1] ?? 0)
    if (pooled >= size) return
    await sleep(20)
  }
  throw new Error('the pool did not fill within 30 s')
}

async function vmcgiOnce(vmcgi: Vmcgi): Promise<number> {
  const started = performance.now()
  const answer = await get(`${vmcgi.url}/`)
  if (answer.status !== 200 || answer.vmcgiStatus !== 'OK') throw new Error(`vmcgi answered ${answer.status} ${answer.vmcgiStatus}`)
  return performance.now() - started
}

/** Closed-loop load: `concurrency` clients, each sending its next request when the last is answered. */
async function throughput(vmcgi: Vmcgi, concurrency: number): Promise<{ rps: number; ok: number; failed: number; cpuPerVm: number; why: string[] }> {
  const before = await cpuSeconds(vmcgi.child.pid!)
  const end = performance.now() + throughputSeconds * 1000
  let ok = 0
  let failed = 0
  const why: string[] = []
  const started = performance.now()
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (performance.now() < end) {
      try {
        const answer = await get(`${vmcgi.url}/`)
        if (answer.status === 200) ok++
        else {
          failed++
          why.push(`${answer.status} ${answer.vmcgiStatus}`)
        }
      } catch (error) {
        failed++
        why.push(String((error as Error).message))
      }
    }
  }))
  const seconds = (performance.now() - started) / 1000
  await sleep(1_500) // let the last VMs be reaped, so their CPU time is counted
  const after = await cpuSeconds(vmcgi.child.pid!)
  const cpu = after.self - before.self + after.children - before.children
  return { rps: ok / seconds, ok, failed, cpuPerVm: ok ? cpu / ok : Number.NaN, why }
}

// ---------------------------------------------------------------- the run

interface CaseResult {
  name: string
  p50: number
  p95: number
  rps: Record<number, number>
  failures: number
  cpuPerVm?: number
}

async function latencies(run: () => Promise<number>, before?: () => Promise<void>): Promise<number[]> {
  const values: number[] = []
  for (let i = 0; i < samples; i++) {
    await before?.()
    values.push(await run())
  }
  return values
}

async function main(): Promise<void> {
  const workDir = mkdtempSync(join(tmpdir(), 'vmcgi-bench-'))
  const results: CaseResult[] = []
  const log = (text: string) => process.stderr.write(`bench: ${text}\n`)
  const qemuVersion = /version ([^\s(]+)/.exec(execFileSync(config.vm.qemu, ['-version']).toString())?.[1] ?? 'unknown'
  log(`${samples} samples per latency, ${throughputSeconds} s per throughput point; accel ${accel.accel}`)

  try {
    // (e) direct: one guest, already up.
    const direct = await spawnBare()
    await pollUntil200(direct.port)
    const directMemory = await memoryOf(direct.child.pid!)
    const directTimes = await latencies(async () => {
      const started = performance.now()
      await get(`http://127.0.0.1:${direct.port}/`)
      return performance.now() - started
    })
    await killBare(direct)
    results.push({ name: 'direct', p50: percentile(directTimes, 50), p95: percentile(directTimes, 95), rps: {}, failures: 0 })
    log('direct done')

    // (a) baseline: spawn, poll, kill. CPU per VM from this process's reaped children.
    const cpuBefore = (await cpuSeconds(process.pid)).children
    const baselineTimes = await latencies(baselineOnce)
    const baselineCpu = ((await cpuSeconds(process.pid)).children - cpuBefore) / samples
    results.push({
      name: 'baseline', p50: percentile(baselineTimes, 50), p95: percentile(baselineTimes, 95), rps: {}, failures: 0, cpuPerVm: baselineCpu,
    })
    log('baseline done')

    const modes: Array<{ name: string; overrides: Record<string, Record<string, unknown>>; poolSize: number; latencyOnly?: boolean }> = [
      { name: 'cold', overrides: {}, poolSize: 0 },
      { name: 'silent', overrides: { readiness: { consoleLine: '' } }, poolSize: 0, latencyOnly: true },
      { name: 'pool', overrides: { pool: { size: 2 } }, poolSize: 2 },
      { name: 'clone', overrides: { vm: { snapshot: { enabled: true, dir: join(workDir, 'snapshots') } } }, poolSize: 0 },
    ]
    let cloneMemory: { rssMiB: number; pssMiB: number } | undefined
    for (const mode of modes) {
      const vmcgi = await startVmcgi(mode.overrides, workDir)
      try {
        const times = await latencies(() => vmcgiOnce(vmcgi), mode.poolSize ? () => waitForPool(vmcgi, mode.poolSize) : undefined)
        const result: CaseResult = { name: mode.name, p50: percentile(times, 50), p95: percentile(times, 95), rps: {}, failures: 0 }
        for (const concurrency of mode.latencyOnly ? [] : concurrencies) {
          if (mode.poolSize) await waitForPool(vmcgi, mode.poolSize)
          const point = await throughput(vmcgi, concurrency)
          result.rps[concurrency] = point.rps
          result.failures += point.failed
          if (point.why.length) log(`${mode.name} c=${concurrency} failures: ${[...new Set(point.why)].join('; ')}`)
          if (concurrency === 4) result.cpuPerVm = point.cpuPerVm
        }
        results.push(result)
        log(`${mode.name} done`)
      } finally {
        await stopVmcgi(vmcgi)
      }
    }

    // A clone's memory, measured like the booted guest's: idle and ready, in a pool of one.
    const clones = await startVmcgi({ pool: { size: 1 }, vm: { snapshot: { enabled: true, dir: join(workDir, 'snapshots') } } }, workDir)
    try {
      await waitForPool(clones, 1)
      const [pid] = await clones.qemuChildren()
      if (pid === undefined) throw new Error('the pool of one has no QEMU')
      cloneMemory = await memoryOf(pid)
    } finally {
      await stopVmcgi(clones)
    }

    report(results, { qemuVersion, directMemory, cloneMemory })
  } finally {
    rmSync(workDir, { recursive: true, force: true })
    await dispatcher.close()
  }
}

function report(results: CaseResult[], extra: { qemuVersion: string; directMemory: { rssMiB: number; pssMiB: number }; cloneMemory?: { rssMiB: number; pssMiB: number } }): void {
  const by = Object.fromEntries(results.map((result) => [result.name, result])) as Record<string, CaseResult>
  const fmt = (value: number | undefined, digits = 0) => (value === undefined || Number.isNaN(value) ? '-' : value.toFixed(digits))
  const lines = [
    '| case | p50 ms | p95 ms | req/s c=1 | req/s c=2 | req/s c=4 | CPU-s per VM | failures |',
    '| --- | --- | --- | --- | --- | --- | --- | --- |',
    ...results.map((r) => `| ${r.name} | ${fmt(r.p50)} | ${fmt(r.p95)} | ${fmt(r.rps[1], 2)} | ${fmt(r.rps[2], 2)} | ${fmt(r.rps[4], 2)} | ${fmt(r.cpuPerVm, 2)} | ${r.failures} |`),
  ]
  const cores = availableParallelism()
  const capacity = cores / (by.cold?.cpuPerVm ?? Number.NaN)
  const targets = [
    { target: 'cold p50 ≤ 1.05 × baseline p50', ratio: by.cold!.p50 / by.baseline!.p50, limit: 1.05, atMost: true },
    { target: 'pool p50 ≤ 1.2 × direct p50', ratio: by.pool!.p50 / by.direct!.p50, limit: 1.2, atMost: true },
    { target: 'clone p50 ≤ 0.25 × baseline p50', ratio: by.clone!.p50 / by.baseline!.p50, limit: 0.25, atMost: true },
    { target: 'cold req/s at c=4 ≥ 0.8 × boot capacity (cores ÷ CPU-s per VM)', ratio: by.cold!.rps[4]! / capacity, limit: 0.8, atMost: false },
  ]
  const targetLines = [
    '| target | measured | met |',
    '| --- | --- | --- |',
    ...targets.map((t) => `| ${t.target} | ${t.ratio.toFixed(2)} | ${(t.atMost ? t.ratio <= t.limit : t.ratio >= t.limit) ? 'yes' : 'no'} |`),
  ]
  const memoryLine = `memory per VM, idle and ready: booted guest RSS ${fmt(extra.directMemory.rssMiB)} MiB (PSS ${fmt(extra.directMemory.pssMiB)}); `
    + `clone RSS ${fmt(extra.cloneMemory?.rssMiB)} MiB (PSS ${fmt(extra.cloneMemory?.pssMiB)})`
  const machine = `${cpus()[0]?.model ?? 'unknown CPU'}, ${cores} cores, ${Math.round(totalmem() / 2 ** 30)} GiB`
  const header = `vmcgi bench: ${machine}; QEMU ${extra.qemuVersion}; accelerator ${accel.accel} (${accel.reason})`
  const silentLine = `a guest that prints no ready line: silent p50 / cold p50 = ${fmt(by.silent?.p50)} / ${fmt(by.cold?.p50)} = ${fmt((by.silent?.p50 ?? Number.NaN) / (by.cold?.p50 ?? Number.NaN), 2)}`
  console.log([header, '', ...lines, '', ...targetLines, '', memoryLine, `boot capacity: ${fmt(capacity, 2)} VMs/s`, silentLine].join('\n'))

  const outDir = join(repo, 'bench/out')
  mkdirSync(outDir, { recursive: true })
  const file = join(outDir, `bench-${new Date().toISOString().replaceAll(':', '-')}.json`)
  writeFileSync(file, JSON.stringify({
    date: new Date().toISOString(),
    machine: { cpu: cpus()[0]?.model, cores, memoryGiB: totalmem() / 2 ** 30, platform: process.platform, arch: process.arch },
    qemu: { binary: config.vm.qemu, version: extra.qemuVersion },
    accel,
    settings: { samples, throughputSeconds, concurrencies },
    results,
    targets,
    memory: { direct: extra.directMemory, clone: extra.cloneMemory },
  }, null, 2))
  console.log(`\nwritten: ${file}`)
}

main().catch((error: unknown) => {
  console.error(error)
  process.exit(1)
})
