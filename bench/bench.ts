// npm run bench: vmcgi against its peers (a bare QEMU boot of the same guest,
// a fresh container per request), side by side in one run, on this machine.
// Prints a table and the targets, and writes JSON to bench/out/.
//
// Cases:
//   direct       GET / to one guest that is already up: the floor
//   baseline     spawn the QEMU command vmcgi would, poll GET / until 200, kill it
//   cold         vmcgi, every request boots its own VM
//   silent       as cold, but vmcgi ignores the guest's ready line: a guest that
//                prints nothing, served by HTTP probing alone (latency only)
//   pool         vmcgi with pool.size 2, VMs booted ahead
//   clone        vmcgi restoring a copy-on-write clone of a saved template
//   pool+clone   both: a pool of 2 restored, reseeded clones
//   container    docker run of a busybox httpd image, GET / until 200, docker rm -f
//                (skipped when no Docker daemon answers; latency, req/s at c=1)
//   image cold   the Python test image as a guest (images/build.sh --from-image), booted per request
//   image clone  the same, in clone mode
// and the memory of an idle clone against a booted guest, for both guests.
//
// Environment: BENCH_SAMPLES (15) latency samples per case, BENCH_IMAGE_SAMPLES
// (8) for the image cases, BENCH_SECONDS (12) per throughput point.
//
// Every loop is bounded in count and time; every QEMU and container started
// here is stopped, on failure too, and the end of the run checks that none is left.

import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { cpuSeconds, memoryOf, qemuProcesses } from '../test/support/proc.js'
import { bareNamePrefix, baselineOnce, killAllBare, killBare, spawnBare } from './bare.js'
import { containerOnce, containerUnavailable, loadContainerImage, removeLeftContainers } from './container.js'
import { defaultGuest, pythonGuest, type Guest, type RawConfig } from './guests.js'
import { closedLoop, dispatcher, get, latencies, log, percentile, pollUntil200 } from './measure.js'
import { report, type CaseMissing, type CaseResult, type Memory, type RunReport } from './report.js'
import { breakdown, LeakError, started, stopAllVmcgi, throughput, vmcgiOnce, waitForPool, withVmcgi } from './vmcgi.js'

function count(name: string, fallback: number): number {
  const value = Number(process.env[name] ?? fallback)
  if (!Number.isInteger(value) || value < 1) throw new Error(`${name} must be a positive integer, not ${process.env[name]}`)
  return value
}

const samples = count('BENCH_SAMPLES', 15)
const imageSamples = count('BENCH_IMAGE_SAMPLES', 8)
const throughputSeconds = count('BENCH_SECONDS', 12)
const concurrencies = [1, 2, 4]

interface VmcgiCase {
  name: string
  guest: Guest
  overrides: RawConfig
  /** Each latency sample (and each throughput point) waits for a full pool first. */
  poolSize: number
  concurrencies: number[]
  samples: number
  path: string
  /** Per request. */
  timeoutMs: number
}

/** Latency, then throughput at each concurrency, through one vmcgi. */
async function vmcgiCase(c: VmcgiCase, workDir: string): Promise<CaseResult> {
  return withVmcgi(c.guest, c.overrides, workDir, async (vmcgi) => {
    const poolFull = c.poolSize ? () => waitForPool(vmcgi, c.poolSize) : undefined
    const firstLine = vmcgi.logLines().length
    const times = await latencies(c.samples, () => vmcgiOnce(vmcgi, c.path, c.timeoutMs), { before: poolFull, name: c.name })
    const result: CaseResult = {
      name: c.name, samples: times.length, p50: percentile(times, 50), p95: percentile(times, 95), rps: {}, failures: 0,
      breakdown: breakdown(vmcgi.logLines().slice(firstLine)),
    }
    for (const concurrency of c.concurrencies) {
      await poolFull?.()
      const point = await throughput(vmcgi, concurrency, throughputSeconds, c.path, c.timeoutMs)
      result.rps[concurrency] = point.rps
      result.failures += point.failed
      if (point.why.length) log(`${c.name} c=${concurrency} failures: ${point.why.join('; ')}`)
      if (concurrency === Math.max(...c.concurrencies)) result.cpuPerVm = point.cpuPerVm
    }
    return result
  })
}

/** The memory of the one pooled VM of a vmcgi with `pool.size: 1`, idle and ready. */
async function pooledMemory(guest: Guest, overrides: RawConfig, workDir: string): Promise<Memory> {
  return withVmcgi(guest, { ...overrides, pool: { size: 1 } }, workDir, async (vmcgi) => {
    await waitForPool(vmcgi, 1, 120_000)
    await sleep(1_000)
    const pids = await vmcgi.qemuChildren()
    if (pids.length !== 1) throw new Error(`a pool of one, idle, has ${pids.length} QEMU processes`)
    return memoryOf(pids[0]!)
  })
}

/** Every qemu-system process this run started that is still running; each is killed. */
async function leftoverQemus(): Promise<string[]> {
  const ours = (await qemuProcesses()).filter((q) => q.state !== 'Z' && (
    q.ppid === process.pid || started.pids.has(q.ppid)
    || (q.name !== undefined && (q.name.startsWith(bareNamePrefix) || started.vmIds.has(q.name)))))
  for (const q of ours) {
    try {
      process.kill(q.pid, 'SIGKILL')
    } catch {
      // gone already
    }
  }
  return ours.map((q) => `qemu ${q.pid} (${q.name ?? 'no -name'}, parent ${q.ppid})`)
}

async function main(): Promise<void> {
  const begun = performance.now()
  const workDir = mkdtempSync(join(tmpdir(), 'vmcgi-bench-'))
  const guest = defaultGuest()
  let imageGuest: Guest | undefined
  const results: CaseResult[] = []
  const missing: CaseMissing[] = []
  const memory: RunReport['memory'] = {}
  const leftover: string[] = []
  log(`${samples} samples per latency (${imageSamples} for the image cases), ${throughputSeconds} s per throughput point; `
    + `accel ${guest.accel.accel}; work dir ${workDir}`)

  // An interrupted run stops what it started: vmcgi (which stops its QEMUs), bare QEMUs, containers.
  // `on`, not `once`: execa's exit hook (signal-exit) kills the process at once when it is the last listener.
  let interrupted = false
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.on(signal, () => {
      if (interrupted) return
      interrupted = true
      log(`${signal}: stopping what the bench started`)
      killAllBare()
      void stopAllVmcgi().finally(() => {
        removeLeftContainers()
        rmSync(workDir, { recursive: true, force: true })
        process.exit(130)
      })
    })
  }

  /**
   * Runs one case (or a step that is none: `body` resolves with null). Its
   * error is recorded and the run goes on, unless a QEMU outlived vmcgi. A
   * string from `body` says why the case was skipped.
   */
  const runCase = async (name: string, body: () => Promise<CaseResult | string | null>): Promise<void> => {
    if (interrupted) return
    const caseBegun = performance.now()
    log(`${name}: starting`)
    try {
      const outcome = await body()
      if (typeof outcome === 'string') {
        missing.push({ name, skipped: outcome })
        log(`${name}: skipped, ${outcome}`)
        return
      }
      if (outcome) results.push(outcome)
      log(`${name}: done in ${((performance.now() - caseBegun) / 1000).toFixed(0)} s`)
    } catch (error) {
      if (error instanceof LeakError) throw error
      missing.push({ name, error: String((error as Error).message) })
      log(`${name}: FAILED after ${((performance.now() - caseBegun) / 1000).toFixed(0)} s: ${(error as Error).stack}`)
    }
  }

  try {
    // direct: one guest, already up.
    await runCase('direct', async () => {
      const direct = await spawnBare(guest)
      try {
        await pollUntil200(direct.port, 'the bare guest')
        memory.direct = await memoryOf(direct.child.pid!)
        const times = await latencies(samples, async () => {
          const begin = performance.now()
          await get(`http://127.0.0.1:${direct.port}/`)
          return performance.now() - begin
        }, { name: 'direct' })
        return { name: 'direct', samples: times.length, p50: percentile(times, 50), p95: percentile(times, 95), rps: {}, failures: 0 }
      } finally {
        await killBare(direct)
      }
    })

    // baseline: spawn, poll, kill. CPU per VM from this process's reaped children.
    await runCase('baseline', async () => {
      const cpuBefore = (await cpuSeconds(process.pid)).children
      const times = await latencies(samples, () => baselineOnce(guest), { name: 'baseline' })
      const cpu = ((await cpuSeconds(process.pid)).children - cpuBefore) / times.length
      return { name: 'baseline', samples: times.length, p50: percentile(times, 50), p95: percentile(times, 95), rps: {}, failures: 0, cpuPerVm: cpu }
    })

    const snapshots = { enabled: true, dir: join(workDir, 'snapshots') }
    const common = { guest, samples, path: '/', timeoutMs: 30_000 }
    const modes: VmcgiCase[] = [
      { ...common, name: 'cold', overrides: {}, poolSize: 0, concurrencies },
      { ...common, name: 'silent', overrides: { readiness: { consoleLine: '' } }, poolSize: 0, concurrencies: [] },
      { ...common, name: 'pool', overrides: { pool: { size: 2 } }, poolSize: 2, concurrencies },
      { ...common, name: 'clone', overrides: { vm: { snapshot: snapshots } }, poolSize: 0, concurrencies },
      { ...common, name: 'pool+clone', overrides: { pool: { size: 2 }, vm: { snapshot: snapshots } }, poolSize: 2, concurrencies },
    ]
    for (const mode of modes) await runCase(mode.name, () => vmcgiCase(mode, workDir))

    // A clone's memory, measured like the booted guest's: idle and ready, in a pool of one.
    await runCase('memory of a clone', async () => {
      memory.clone = await pooledMemory(guest, { vm: { snapshot: snapshots } }, workDir)
      return null
    })

    await runCase('container', async () => {
      const unavailable = await containerUnavailable()
      if (unavailable) return unavailable
      await loadContainerImage()
      await containerOnce() // Docker's first run after a while is slower: not a sample, as vmcgi's preflight boot is none
      const times = await latencies(samples, async () => (await containerOnce()).toAnswerMs, { name: 'container' })
      // req/s at c=1: run, answer, remove, one after another.
      const load = await closedLoop(1, throughputSeconds, async () => void await containerOnce())
      if (load.why.length) log(`container c=1 failures: ${load.why.join('; ')}`)
      return { name: 'container', samples: times.length, p50: percentile(times, 50), p95: percentile(times, 95), rps: { 1: load.rps }, failures: load.failed }
    })

    // The Python image, served by vmcgi from the config its build wrote.
    await runCase('image build', async () => {
      imageGuest = await pythonGuest(join(workDir, 'python'))
      return null
    })
    if (imageGuest) {
      const image = { guest: imageGuest, samples: imageSamples, path: '/bench', timeoutMs: 60_000 }
      const imageSnapshots = { enabled: true, dir: join(workDir, 'image-snapshots') }
      await runCase('image cold', () => vmcgiCase({ ...image, name: 'image cold', overrides: {}, poolSize: 0, concurrencies: [] }, workDir))
      await runCase('image clone', () => vmcgiCase({ ...image, name: 'image clone', overrides: { vm: { snapshot: imageSnapshots } }, poolSize: 0, concurrencies: [4] }, workDir))
      await runCase('image memory', async () => {
        memory.imageClone = await pooledMemory(imageGuest!, { vm: { snapshot: imageSnapshots } }, workDir)
        memory.imageBooted = await pooledMemory(imageGuest!, {}, workDir)
        return null
      })
    } else {
      for (const name of ['image cold', 'image clone']) missing.push({ name, skipped: 'the image build failed' })
    }
  } finally {
    const outlived = await stopAllVmcgi()
    killAllBare()
    const containers = removeLeftContainers()
    await sleep(500)
    leftover.push(...outlived, ...(await leftoverQemus()), ...containers.map((id) => `container ${id}`))
    rmSync(workDir, { recursive: true, force: true })
    await dispatcher.close()
  }

  report({
    results, missing, defaultGuest: guest, imageGuest, memory, leftover,
    settings: { samples, imageSamples, throughputSeconds, concurrencies },
    totalSeconds: (performance.now() - begun) / 1000,
  })
  // Only the cases that failed or left something running fail the run; a skipped case does not.
  if (leftover.length || missing.some((m) => m.error)) process.exitCode = 1
}

main().catch((error: unknown) => {
  console.error(error)
  process.exit(1)
})
