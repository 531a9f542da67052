// Starts the real vmcgi CLI (dist/main.js) with a config file, for the end-to-end tests, the soak and the benchmark.
//
// It waits until the proxy listens, keeps vmcgi's log lines, finds the QEMU
// processes it owns and stops it. Nothing here depends on a test runner: the
// e2e harness registers the cleanup and turns what stop() reports into an
// assertion.

import { existsSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { execa, type ResultPromise } from 'execa'
import getPort from 'get-port'
import { processState, qemuChildren } from './proc.js'

/** The repository: the nearest folder above with a package.json, whether this runs from test/ or compiled into build/. */
export const repo = findRepo(import.meta.dirname)
export const mainJs = join(repo, 'dist/main.js')

function findRepo(from: string): string {
  for (let dir = from; ; dir = dirname(dir)) {
    if (existsSync(join(dir, 'package.json'))) return dir
    if (dirname(dir) === dir) throw new Error(`no package.json above ${from}`)
  }
}

export type LogLine = Record<string, unknown>

export interface SpawnOptions {
  /** The proxy's port (passed as --port); a free one on 127.0.0.1 when omitted. */
  port?: number
  /** 'pipe' keeps vmcgi's stderr for the error a failed start throws; 'inherit' passes it through. */
  stderr?: 'pipe' | 'inherit'
  /** How long vmcgi has to start listening; 30 s by default. */
  listenTimeoutMs?: number
  /** Cancels the wait for the listener (vmcgi is then killed). */
  signal?: AbortSignal
  /** Starts vmcgi with at most this many open descriptors (soft and hard RLIMIT_NOFILE, through prlimit). */
  openFiles?: number
}

export interface VmcgiProcess {
  /** The proxy, http://127.0.0.1:port. */
  url: string
  child: ResultPromise
  /** vmcgi's JSON log lines so far (lines that are not JSON are left out). */
  logLines: () => LogLine[]
  /** The admin listener's URL, once its "Server listening" line is logged. */
  adminUrl: (timeoutMs?: number) => Promise<string>
  /** QEMU processes whose parent is this vmcgi. */
  qemuChildren: () => Promise<number[]>
  /**
   * SIGTERM, then waits for vmcgi to exit (execa sends SIGKILL 5 s later) and
   * up to 2 s for the QEMU children it had to be reaped. Resolves with those
   * still alive, as "pid: state"; idempotent.
   */
  stop: () => Promise<string[]>
}

const listeningMessage = /^Server listening at (\S+)/

/** Starts `node dist/main.js --config configFile --port …` and resolves once the proxy listens. */
export async function spawnVmcgi(configFile: string, options: SpawnOptions = {}): Promise<VmcgiProcess> {
  const { stderr: stderrMode = 'pipe', listenTimeoutMs = 30_000, signal, openFiles } = options
  signal?.throwIfAborted()
  const port = options.port ?? await getPort({ host: '127.0.0.1' })
  const argv = [process.execPath, mainJs, '--config', configFile, '--port', String(port)]
  // prlimit execs the command, so that the child's pid is vmcgi's.
  const [file, ...args] = openFiles === undefined ? argv : ['prlimit', `--nofile=${openFiles}:${openFiles}`, '--', ...argv]
  const child = execa(file!, args, {
    reject: false, buffer: false, stdin: 'ignore', stdout: 'pipe', stderr: stderrMode,
  })

  let stderr = ''
  child.stderr?.setEncoding('utf8').on('data', (text: string) => (stderr += text))
  const lines: LogLine[] = []
  const waiters = new Set<(line: LogLine) => void>()
  let partial = ''
  const take = (text: string) => {
    let line: LogLine
    try {
      line = JSON.parse(text) as LogLine
    } catch {
      return
    }
    lines.push(line)
    for (const waiter of waiters) waiter(line)
  }
  child.stdout!.setEncoding('utf8')
  child.stdout!.on('data', (text: string) => {
    const complete = (partial + text).split('\n')
    partial = complete.pop()!
    complete.forEach(take)
  })
  child.stdout!.on('end', () => partial && take(partial))

  /** Resolves with the first log line, logged already or later, that `matches`. */
  const waitForLine = (what: string, matches: (line: LogLine) => boolean, timeoutMs: number, waitSignal?: AbortSignal) =>
    new Promise<LogLine>((resolve, reject) => {
      const seen = lines.find(matches)
      if (seen) return resolve(seen)
      const done = (settle: () => void) => {
        waiters.delete(waiter)
        clearTimeout(timer)
        waitSignal?.removeEventListener('abort', aborted)
        settle()
      }
      const waiter = (line: LogLine) => matches(line) && done(() => resolve(line))
      const timer = setTimeout(() => done(() => reject(new Error(`vmcgi did not log ${what} within ${timeoutMs / 1000} s`))), timeoutMs)
      const aborted = () => done(() => reject(waitSignal!.reason))
      waiters.add(waiter)
      waitSignal?.addEventListener('abort', aborted, { once: true })
      void child.then((result) => done(() => reject(new Error(`vmcgi exited (${result.exitCode ?? result.signal}) before it logged ${what}: ${stderr}`))))
    })
  const listening = (listener: 'proxy' | 'admin') => (line: LogLine) =>
    typeof line.msg === 'string' && listeningMessage.test(line.msg) && (line.listener === 'admin') === (listener === 'admin')

  const children = () => qemuChildren(child.pid!)
  let stopped: Promise<string[]> | undefined
  const vmcgi: VmcgiProcess = {
    url: `http://127.0.0.1:${port}`,
    child,
    logLines: () => [...lines],
    adminUrl: async (timeoutMs = 30_000) => {
      const line = await waitForLine('the admin listener', listening('admin'), timeoutMs)
      return listeningMessage.exec(line.msg as string)![1]!
    },
    qemuChildren: children,
    stop: () => (stopped ??= (async () => {
      const before = await children()
      child.kill('SIGTERM')
      await child
      // Nothing this vmcgi started may outlive it (a killed process may take a moment to be reaped).
      const alive = async () => {
        const left = before.filter((pid) => existsSync(`/proc/${pid}`))
        return Promise.all(left.map(async (pid) => `${pid}: ${await processState(pid)}`))
      }
      for (let waited = 0; waited < 2_000 && (await alive()).length > 0; waited += 50) await sleep(50)
      return alive()
    })()),
  }

  try {
    await waitForLine('that the proxy listens', listening('proxy'), listenTimeoutMs, signal)
  } catch (error) {
    child.kill('SIGKILL')
    await child
    throw error
  }
  return vmcgi
}
