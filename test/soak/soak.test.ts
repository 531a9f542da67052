// Soak and overload: hundreds of requests through the real vmcgi CLI and the
// default guest, sequential, then concurrent, then a burst well past
// limits.maxVms and the queue. Between phases vmcgi's own descriptors,
// listeners, child processes and memory are read from /proc: whatever a
// request leaks shows up here, multiplied. Most of the VMs go through the
// concurrent phase, where a leak shows as well and VMs overlap in every
// phase of their lives, in a third of the time one at a time would take.
// About two and a half minutes on two cores under TCG; every phase has its
// own time budget.

import { readFile } from 'node:fs/promises'
import { Agent, request } from 'undici'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { repo, startVmcgi, type Vmcgi } from '../e2e/harness.js'
import { childPids, fdCount, qemuProcesses, sampleProcess, type ProcSample } from '../support/proc.js'

const maxVms = 4
const queue = { size: 2 * maxVms, maxWaitMs: 20_000 }
/** A request that takes longer than this is a failure (timeouts.requestMs is 25 s). */
const requestDeadlineMs = 40_000
/** Descriptors vmcgi may hold after a phase beyond what it held at the start. */
const fdSlack = 5
const rssGrowthLimitMiB = 80
const settleMs = 5_000
const minute = 60_000

type Kind = 'page' | 'id' | 'echo'

interface Outcome {
  kind: Kind
  /** 200, vmcgi-status OK, and the body the guest should send. */
  ok: boolean
  /** 503, vmcgi-status overloaded, with Retry-After: the designed refusal. */
  refused: boolean
  ms: number
  detail: string
  guestId?: string
}

interface PhaseReport {
  name: string
  count: number
  ok: number
  refused: number
  other: number
  p50: number
  p95: number
  max: number
  perSecond: number
  seconds: number
  before: ProcSample
  after: ProcSample
}

let indexHtml: string

/** Sends one request of `kind` and classifies the answer; never throws. */
async function send(vmcgi: Vmcgi, agent: Agent, kind: Kind, n: number): Promise<Outcome> {
  const started = performance.now()
  const payload = `soak ${n} ${'x'.repeat(n % 200)}`
  const path = kind === 'page' ? `/?soak=${n}` : kind === 'id' ? '/cgi-bin/id' : `/cgi-bin/echo?soak=${n}`
  const elapsed = () => Math.round(performance.now() - started)
  try {
    const res = await request(`${vmcgi.url}${path}`, {
      dispatcher: agent,
      signal: AbortSignal.timeout(requestDeadlineMs),
      ...(kind === 'echo' ? { method: 'POST' as const, headers: { 'content-type': 'text/plain' }, body: payload } : {}),
    })
    const body = await res.body.text()
    const ms = elapsed()
    const status = res.headers['vmcgi-status']
    const retryAfter = res.headers['retry-after']
    const detail = `${kind} ${path}: ${res.statusCode} vmcgi-status=${String(status)} retry-after=${String(retryAfter)} after ${ms} ms`
    if (res.statusCode === 503 && status === 'overloaded' && typeof retryAfter === 'string' && /^\d+$/.test(retryAfter)) {
      return { kind, ok: false, refused: true, ms, detail }
    }
    if (res.statusCode !== 200 || status !== 'OK') return { kind, ok: false, refused: false, ms, detail: `${detail}: ${body.slice(0, 200)}` }
    if (kind === 'page' && body !== indexHtml) return { kind, ok: false, refused: false, ms, detail: `${detail}: not the guest's index.html` }
    if (kind === 'echo' && !body.endsWith(`body:\n${payload}`)) return { kind, ok: false, refused: false, ms, detail: `${detail}: body not echoed: ${body.slice(-200)}` }
    let guestId: string | undefined
    if (kind === 'id') {
      guestId = /^id: ([0-9a-f]{32})$/m.exec(body)?.[1]
      if (!guestId) return { kind, ok: false, refused: false, ms, detail: `${detail}: no id: ${body.slice(0, 200)}` }
    }
    return { kind, ok: true, refused: false, ms, detail, guestId }
  } catch (error) {
    const ms = elapsed()
    return { kind, ok: false, refused: false, ms, detail: `${kind} ${path}: ${(error as Error).name}: ${(error as Error).message} after ${ms} ms` }
  }
}

/**
 * Sends `count` requests from `concurrency` workers, each taking the next
 * request as soon as its previous one is answered. Fails once `budgetMs` has
 * passed; every request is itself bounded by requestDeadlineMs.
 */
async function runPhase(vmcgi: Vmcgi, agent: Agent, count: number, concurrency: number, budgetMs: number, name: string) {
  const outcomes: Outcome[] = []
  const kinds: Kind[] = ['page', 'id', 'echo']
  const deadline = Date.now() + budgetMs
  let next = 0
  let overrun = false
  const worker = async () => {
    for (;;) {
      const n = next++
      if (n >= count || overrun) return
      if (Date.now() > deadline) {
        overrun = true
        throw new Error(`${name}: over its budget of ${budgetMs / 1000} s after ${outcomes.length} of ${count} requests`)
      }
      outcomes[n] = await send(vmcgi, agent, kinds[n % kinds.length]!, n)
    }
  }
  const started = performance.now()
  await Promise.all(Array.from({ length: concurrency }, worker))
  return { outcomes, seconds: (performance.now() - started) / 1000 }
}

/** Polls `condition` every 50 ms for up to settleMs; the caller checks what is left. */
async function waitUntil(condition: () => Promise<boolean>): Promise<void> {
  const until = Date.now() + settleMs
  while (!(await condition()) && Date.now() < until) await new Promise((resolve) => setTimeout(resolve, 50))
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!
}

function summarize(name: string, outcomes: Outcome[], seconds: number, before: ProcSample, after: ProcSample): PhaseReport {
  const served = outcomes.filter((outcome) => outcome.ok).map((outcome) => outcome.ms).sort((a, b) => a - b)
  const refused = outcomes.filter((outcome) => outcome.refused).length
  return {
    name,
    count: outcomes.length,
    ok: served.length,
    refused,
    other: outcomes.length - served.length - refused,
    p50: percentile(served, 50),
    p95: percentile(served, 95),
    max: served.at(-1) ?? NaN,
    perSecond: outcomes.length / seconds,
    seconds,
    before,
    after,
  }
}

const header = 'phase        count   ok  503 other   p50   p95   max  req/s  wall s |  fds      listeners  children  RSS MiB'
function row(report: PhaseReport): string {
  const { before: b, after: a } = report
  const cells = [
    report.name.padEnd(11),
    String(report.count).padStart(6),
    String(report.ok).padStart(4),
    String(report.refused).padStart(4),
    String(report.other).padStart(5),
    String(report.p50).padStart(5),
    String(report.p95).padStart(5),
    String(report.max).padStart(5),
    report.perSecond.toFixed(2).padStart(6),
    report.seconds.toFixed(1).padStart(7),
    `| ${`${b.fds}→${a.fds}`.padEnd(8)}`,
    `${b.listeners.length}→${a.listeners.length}`.padEnd(10),
    `${b.children.length}→${a.children.length}`.padEnd(9),
    `${b.rssMiB.toFixed(1)}→${a.rssMiB.toFixed(1)}`,
  ]
  return cells.join(' ')
}

describe('soak: hundreds of VMs through one vmcgi', () => {
  let vmcgi: Vmcgi
  let pid: number
  let listener: string
  /** The proxy's listener and, when admin.enabled, the admin listener: fixed for the whole run. */
  let listeners: string[]
  let start: ProcSample
  let last: ProcSample
  let startedAt: number
  const reports: PhaseReport[] = []
  const guestIds = new Set<string>()
  let idAnswers = 0
  let sent = 0

  /** Ends the phase's connections, waits for its VMs and sockets to go, and samples vmcgi. */
  async function settle(agent: Agent): Promise<ProcSample> {
    await agent.close()
    await waitUntil(async () => (await childPids(pid)).length === 0)
    // The client closed its sockets; give vmcgi a moment to see the FINs.
    if (start) {
      await waitUntil(async () => (await fdCount(pid)) <= start.fds + fdSlack)
    } else {
      let previous = -1
      await waitUntil(async () => {
        const now = await fdCount(pid)
        const steady = now === previous
        previous = now
        await new Promise((resolve) => setTimeout(resolve, 200))
        return steady
      })
    }
    return sampleProcess(pid)
  }

  function expectNothingLeaked(sample: ProcSample, when: string): void {
    expect(sample.children, `${when}: child processes of vmcgi`).toEqual([])
    expect(sample.listeners, `${when}: TCP listeners of vmcgi`).toEqual(listeners)
    expect(sample.fds, `${when}: open fds of vmcgi (${start.fds} at the start)`).toBeLessThanOrEqual(start.fds + fdSlack)
    expect(sample.rssMiB, `${when}: RSS of vmcgi in MiB (${start.rssMiB.toFixed(1)} at the start)`).toBeLessThan(start.rssMiB + rssGrowthLimitMiB)
  }

  async function phase(name: string, count: number, concurrency: number, budgetMs: number): Promise<PhaseReport> {
    const before = last
    const agent = new Agent({ connections: concurrency })
    let result: Awaited<ReturnType<typeof runPhase>>
    try {
      result = await runPhase(vmcgi, agent, count, concurrency, budgetMs, name)
    } finally {
      last = await settle(agent)
    }
    sent += count
    for (const outcome of result.outcomes) {
      if (!outcome.guestId) continue
      idAnswers++
      guestIds.add(outcome.guestId)
    }
    const report = summarize(name, result.outcomes, result.seconds, before, last)
    reports.push(report)
    console.log(`${header}\n${row(report)}`)
    const failures = result.outcomes.filter((outcome) => !outcome.ok && !outcome.refused).map((outcome) => outcome.detail)
    expect(failures, `${name}: failures other than 503 overloaded`).toEqual([])
    expectNothingLeaked(last, `after ${name}`)
    return report
  }

  beforeAll(async () => {
    startedAt = performance.now()
    indexHtml = await readFile(`${repo}/images/site/index.html`, 'utf8')
    // No pool: VMs boot on demand, so at rest vmcgi has no child process at all.
    vmcgi = await startVmcgi({ log: { level: 'info' }, limits: { maxVms, queue }, pool: { size: 0 } })
    pid = vmcgi.child.pid!
    listener = `127.0.0.1:${new URL(vmcgi.url).port}`
    const warmUp = new Agent()
    for (const kind of ['page', 'id'] as const) {
      const outcome = await send(vmcgi, warmUp, kind, 0)
      expect(outcome.ok, outcome.detail).toBe(true)
    }
    sent += 2
    start = await settle(warmUp)
    last = start
    // The proxy, and the admin listener (/metrics) the harness enables on a free port.
    expect(start.listeners, 'TCP listeners of vmcgi').toContain(listener)
    expect(start.listeners.length, `TCP listeners of vmcgi: ${start.listeners.join(', ')}`).toBeLessThanOrEqual(2)
    expect(start.listeners.every((address) => address.startsWith('127.0.0.1:'))).toBe(true)
    listeners = start.listeners
    expect(start.children).toEqual([])
  }, 2 * minute)

  afterAll(async () => {
    if (reports.length > 0) {
      console.log([
        `soak: vmcgi pid ${pid}, limits.maxVms ${maxVms}, queue ${queue.size} × ${queue.maxWaitMs} ms; latencies of 200s in ms`,
        header,
        ...reports.map(row),
        `start: ${start.fds} fds, RSS ${start.rssMiB.toFixed(1)} MiB; end: ${last.fds} fds, RSS ${last.rssMiB.toFixed(1)} MiB (${(last.rssMiB - start.rssMiB).toFixed(1)} MiB more); `
          + `${guestIds.size} distinct guest ids in ${idAnswers} answers; ${((performance.now() - startedAt) / 1000).toFixed(0)} s in all`,
      ].join('\n'))
    }
    await vmcgi?.stop()
  }, 2 * minute)

  it('answers 60 sequential requests, all 200 OK, and leaks nothing', async () => {
    const report = await phase('sequential', 60, 1, 4 * minute)
    expect(report.ok).toBe(60)
  }, 6 * minute)

  it('answers 250 requests at concurrency maxVms, none refused, and leaks nothing', async () => {
    const report = await phase('concurrent', 250, maxVms, 9 * minute)
    expect(report.refused, 'refused with the queue this large').toBe(0)
    expect(report.ok).toBe(250)
  }, 11 * minute)

  it('answers a burst of 10 × maxVms with 200 OK or 503 overloaded only, and leaks nothing', async () => {
    const report = await phase('burst', 10 * maxVms, 10 * maxVms, 3 * minute)
    expect(report.ok, 'some of the burst served').toBeGreaterThan(0)
    expect(report.ok + report.refused).toBe(10 * maxVms)
  }, 5 * minute)

  it('logs one line per request, gives every VM a different id, and keeps its memory bounded', async () => {
    expect(reports.map((report) => report.name)).toEqual(['sequential', 'concurrent', 'burst'])
    await expect.poll(() => vmcgi.logLines().filter((line) => line.msg === 'request').length).toBe(sent)
    expect(guestIds.size, 'distinct /cgi-bin/id answers').toBe(idAnswers)
    // Overload is answered at info level: anything at warn or above is a fault.
    const warnings = vmcgi.logLines().filter((line) => Number(line.level) >= 40)
    expect(warnings, 'log lines at warn level or above').toEqual([])
    expect(last.rssMiB).toBeLessThan(start.rssMiB + rssGrowthLimitMiB)
  })

  it('stops on SIGTERM with status 0 and leaves no QEMU behind', async () => {
    // Every VM this vmcgi ran, by the id it gives QEMU as -name.
    const vmIds = new Set(vmcgi.logLines().flatMap((line) => JSON.stringify(line).match(/\bvm-[0-9a-f]{8}\b/g) ?? []))
    expect(vmIds.size, 'VMs named in the log').toBeGreaterThanOrEqual(reports.reduce((sum, report) => sum + report.ok, 2))
    await vmcgi.stop()
    expect((await vmcgi.child).exitCode).toBe(0)
    const ours = (await qemuProcesses()).filter((qemu) => qemu.ppid === pid || (qemu.name !== undefined && vmIds.has(qemu.name)))
    expect(ours, 'QEMU processes of this vmcgi still alive').toEqual([])
    // And none at all on the machine; a QEMU that just exited may stay a zombie for a moment.
    const everywhere = async () => (await qemuProcesses()).map((qemu) => `${qemu.pid} (parent ${qemu.ppid}, ${qemu.state}) ${qemu.command.slice(0, 160)}`)
    await expect.poll(everywhere, { timeout: settleMs, interval: 100, message: 'qemu-system processes on this machine' }).toEqual([])
  }, 2 * minute)
})
