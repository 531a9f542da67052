// Measuring, for every case of the bench: one HTTP GET, percentiles, a bounded
// series of latency samples and a bounded closed loop of clients.

import { performance } from 'node:perf_hooks'
import { Agent, request } from 'undici'

export const dispatcher = new Agent({ keepAliveTimeout: 1_000, headersTimeout: 60_000, bodyTimeout: 60_000 })

export const log = (text: string): void => void process.stderr.write(`bench: ${text}\n`)

export function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b)
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? Number.NaN
}

export function median(values: number[]): number {
  return percentile(values, 50)
}

export async function get(url: string, timeoutMs = 30_000): Promise<{ status: number; vmcgiStatus: string | undefined }> {
  const res = await request(url, { dispatcher, signal: AbortSignal.timeout(timeoutMs) })
  await res.body.dump()
  return { status: res.statusCode, vmcgiStatus: res.headers['vmcgi-status'] as string | undefined }
}

/** What a shell loop of `curl --max-time 0.1` does, without a process per try. */
export async function pollUntil200(port: number, what: string, deadlineMs = 20_000): Promise<void> {
  const end = performance.now() + deadlineMs
  while (performance.now() < end) {
    try {
      if ((await get(`http://127.0.0.1:${port}/`, 100)).status === 200) return
    } catch {
      // not up yet
    }
  }
  throw new Error(`${what} did not answer within ${deadlineMs / 1000} s`)
}

/**
 * `count` samples of `run` (each timed by `run` itself), one at a time, with
 * `before` run ahead of each, untimed. Stops early, with the samples so far,
 * once `budgetMs` has passed.
 */
export async function latencies(
  count: number,
  run: () => Promise<number>,
  { before, budgetMs = 10 * 60_000, name = 'case' }: { before?: () => Promise<void>; budgetMs?: number; name?: string } = {},
): Promise<number[]> {
  const end = performance.now() + budgetMs
  const values: number[] = []
  for (let i = 0; i < count; i++) {
    if (performance.now() > end) {
      log(`${name}: stopped after ${values.length} of ${count} samples (budget of ${budgetMs / 1000} s spent)`)
      break
    }
    await before?.()
    values.push(await run())
  }
  return values
}

export interface LoadResult {
  rps: number
  ok: number
  failed: number
  /** Why requests failed, each reason once. */
  why: string[]
  seconds: number
}

/**
 * Closed-loop load: `concurrency` clients, each starting its next `once` when
 * the last one is done, for `seconds` (the requests in flight then are
 * finished and counted). `once` resolves with an error text for a failure.
 */
export async function closedLoop(concurrency: number, seconds: number, once: () => Promise<string | undefined>): Promise<LoadResult> {
  const started = performance.now()
  const end = started + seconds * 1000
  let ok = 0
  let failed = 0
  const why = new Set<string>()
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (performance.now() < end) {
      let error: string | undefined
      try {
        error = await once()
      } catch (thrown) {
        error = String((thrown as Error).message)
      }
      if (error === undefined) ok++
      else {
        failed++
        why.add(error)
      }
    }
  }))
  const elapsed = (performance.now() - started) / 1000
  return { rps: ok / elapsed, ok, failed, why: [...why], seconds: elapsed }
}
