// The peer a user would pick instead of vmcgi: a fresh container per request.
// `docker run --rm -d -p 127.0.0.1:PORT:8081` of the static busybox test
// image, GET / until 200, `docker rm -f`. Needs a Docker daemon that answers;
// the bench never starts one. Every container is named vmcgi-bench-PID-N, so
// that none outlives the run.

import { execFileSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { performance } from 'node:perf_hooks'
import { execa } from 'execa'
import getPort from 'get-port'
import { repo } from '../test/support/vmcgi.js'
import { pollUntil200 } from './measure.js'

export const containerImage = 'vmcgi-test/static:latest'
const archive = join(repo, 'images/out/test-images/docker-archive.tar')
const namePrefix = `vmcgi-bench-${process.pid}-`
let made = 0

/** Why the container case cannot run here, or undefined when it can. */
export async function containerUnavailable(): Promise<string | undefined> {
  const info = await execa('docker', ['info'], { reject: false, timeout: 20_000, stdin: 'ignore' })
  if (info.exitCode !== 0 || info.failed) {
    const why = String(info.stderr || info.shortMessage || '').split('\n').find(Boolean) ?? 'failed'
    return `no Docker daemon answers (docker info: ${why})`
  }
  if (!existsSync(archive)) return `no ${archive}: run \`bash test/images/build.sh\` (as root) first`
  return undefined
}

/** `docker load` of the test image (cheap when it is loaded already). */
export async function loadContainerImage(): Promise<void> {
  await execa('docker', ['load', '-i', archive], { timeout: 120_000, stdin: 'ignore' })
}

/** One container, from `docker run` to the first 200; removed afterwards. Resolves with the time to the 200 and to its removal. */
export async function containerOnce(): Promise<{ toAnswerMs: number; cycleMs: number }> {
  const port = await getPort({ host: '127.0.0.1' })
  const name = `${namePrefix}${++made}`
  const started = performance.now()
  let removed = false
  try {
    await execa('docker', ['run', '--rm', '-d', '--name', name, '-p', `127.0.0.1:${port}:8081`, containerImage], { timeout: 60_000, stdin: 'ignore' })
    await pollUntil200(port, `the container ${name}`)
    const toAnswerMs = performance.now() - started
    await removeContainer(name)
    removed = true
    return { toAnswerMs, cycleMs: performance.now() - started }
  } finally {
    if (!removed) await removeContainer(name)
  }
}

async function removeContainer(name: string): Promise<void> {
  await execa('docker', ['rm', '-f', name], { reject: false, timeout: 60_000, stdin: 'ignore' })
}

/** This run's containers still there (none, unless removal failed); removes them. Synchronous, for an interrupted run too. */
export function removeLeftContainers(): string[] {
  let left: string[]
  try {
    left = execFileSync('docker', ['ps', '-aq', '--filter', `name=^${namePrefix}`], { encoding: 'utf8', timeout: 20_000, stdio: ['ignore', 'pipe', 'ignore'] })
      .split('\n').filter(Boolean)
  } catch {
    return []
  }
  if (left.length) execFileSync('docker', ['rm', '-f', ...left], { timeout: 60_000, stdio: 'ignore' })
  return left
}
