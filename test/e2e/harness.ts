// Starts the real vmcgi CLI (dist/main.js) against the real guest image, and
// finds the QEMU processes it owns. Every vmcgi started here is stopped, and
// its VMs checked gone, when the test file ends.

import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { execa, type ResultPromise } from 'execa'
import getPort from 'get-port'
import { request } from 'undici'
import { afterAll, expect } from 'vitest'

export const repo = resolve(import.meta.dirname, '../..')
export const mainJs = join(repo, 'dist/main.js')

export function imageDir(name = 'aarch64'): string {
  const dir = join(repo, 'images/out', name)
  if (!existsSync(join(dir, 'Image')) || !existsSync(join(dir, 'initramfs.cpio.gz'))) {
    throw new Error(`no guest image in ${dir}: run \`npm run images\` first`)
  }
  return dir
}

export interface Vmcgi {
  url: string
  child: ResultPromise
  logLines: () => Array<Record<string, unknown>>
  /** QEMU processes whose parent is this vmcgi. */
  qemuChildren: () => Promise<number[]>
  stop: () => Promise<void>
}

type Section = Record<string, unknown>

/** Writes a config for the given image (default: the default guest) merged with `overrides`. */
export function writeConfig(overrides: Record<string, Section> = {}, image = imageDir()): string {
  const dir = mkdtempSync(join(tmpdir(), 'vmcgi-e2e-'))
  afterAll(() => rmSync(dir, { recursive: true, force: true }))
  const config = {
    ...overrides,
    log: { level: 'debug', ...overrides.log },
    admin: { port: 0, ...overrides.admin },
    vm: { kernel: join(image, 'Image'), initrd: join(image, 'initramfs.cpio.gz'), ...overrides.vm },
  }
  const file = join(dir, 'config.json')
  writeFileSync(file, JSON.stringify(config, null, 2))
  return file
}

const running = new Set<Vmcgi>()
afterAll(async () => {
  await Promise.all([...running].map((vmcgi) => vmcgi.stop()))
})

export async function startVmcgi(overrides: Record<string, Section> = {}, image?: string): Promise<Vmcgi> {
  const config = writeConfig(overrides, image)
  const port = await getPort({ host: '127.0.0.1' })
  const child = execa('node', [mainJs, '--config', config, '--port', String(port)], { reject: false, buffer: false, stdout: 'pipe', stderr: 'pipe' })
  const lines: string[] = []
  let stderr = ''
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()))
  const listening = new Promise<void>((resolveListening, reject) => {
    let partial = ''
    child.stdout!.on('data', (chunk: Buffer) => {
      const text = partial + chunk.toString()
      const complete = text.split('\n')
      partial = complete.pop()!
      for (const line of complete) {
        lines.push(line)
        if (line.includes('Server listening')) resolveListening()
      }
    })
    void child.then((result) => reject(new Error(`vmcgi exited (${result.exitCode}) before listening: ${stderr}`)))
    setTimeout(() => reject(new Error('vmcgi did not listen within 30 s')), 30_000).unref()
  })

  const qemuChildren = async () => {
    const found = await execa('pgrep', ['-P', String(child.pid), '-f', 'qemu-system'], { reject: false })
    return found.stdout.split('\n').filter(Boolean).map(Number)
  }
  let stopped: Promise<void> | undefined
  const vmcgi: Vmcgi = {
    url: `http://127.0.0.1:${port}`,
    child,
    qemuChildren,
    logLines: () => lines.flatMap((line) => {
      try {
        return [JSON.parse(line) as Record<string, unknown>]
      } catch {
        return []
      }
    }),
    stop: () => (stopped ??= (async () => {
      const orphansBefore = await qemuChildren()
      child.kill('SIGTERM')
      await child
      running.delete(vmcgi)
      // Nothing this vmcgi started may outlive it (a killed process may take a moment to be reaped).
      // expect.poll is for tests only, and this also runs in afterAll.
      const alive = () => orphansBefore.filter((pid) => existsSync(`/proc/${pid}`)).map((pid) => `${pid}: ${processState(pid)}`)
      for (let waited = 0; waited < 2_000 && alive().length; waited += 50) await sleep(50)
      expect(alive()).toEqual([])
    })()),
  }
  running.add(vmcgi)
  await listening
  return vmcgi
}

function processState(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.slice(0, 20) ?? 'gone'
  } catch {
    return 'gone'
  }
}

/** What vmcgi-vm-boot-time looks like. */
export const bootTime = /^\d+ ms \(hardware acceleration (enabled|disabled)\)$/

/** GET / answers the default guest's page with vmcgi's headers, and its VM is then killed. */
export async function expectGuestPage(vmcgi: Vmcgi): Promise<void> {
  const res = await request(`${vmcgi.url}/`)
  expect(res.statusCode).toBe(200)
  expect(res.headers['vmcgi-status']).toBe('OK')
  expect(res.headers['vmcgi-vm-boot-time']).toMatch(bootTime)
  expect(await res.body.text()).toBe(await readGuestFile('images/site/index.html'))
  await expectNoVms(vmcgi)
}

/** Waits until this vmcgi has no QEMU child left; fails after `ms`. */
export async function expectNoVms(vmcgi: Vmcgi, ms = 5_000): Promise<void> {
  await expect.poll(vmcgi.qemuChildren, { timeout: ms, interval: 50 }).toEqual([])
}

/** Every qemu-system process on the machine, for the end-of-file check. */
export async function allQemuProcesses(): Promise<string[]> {
  const found = await execa('pgrep', ['-a', 'qemu-system'], { reject: false })
  return found.stdout.split('\n').filter(Boolean)
}

export async function readGuestFile(path: string): Promise<string> {
  return readFile(join(repo, path), 'utf8')
}

/** The TCP addresses a process listens on (ip:port), read from /proc. */
export async function listeningAddresses(pid: number): Promise<string[]> {
  const { readdir, readlink } = await import('node:fs/promises')
  const inodes = new Set<string>()
  for (const fd of await readdir(`/proc/${pid}/fd`)) {
    const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')
    const match = /^socket:\[(\d+)\]$/.exec(target)
    if (match) inodes.add(match[1]!)
  }
  const listening: string[] = []
  for (const table of ['tcp', 'tcp6']) {
    const text = await readFile(`/proc/net/${table}`, 'utf8').catch(() => '')
    for (const line of text.split('\n').slice(1)) {
      const fields = line.trim().split(/\s+/)
      // local address, state 0A = LISTEN, inode
      if (fields[3] !== '0A' || !inodes.has(fields[9]!)) continue
      const [hexIp, hexPort] = fields[1]!.split(':') as [string, string]
      const ip = hexIp.length === 8
        ? Buffer.from(hexIp, 'hex').reverse().join('.')
        : `[${hexIp}]`
      listening.push(`${ip}:${parseInt(hexPort, 16)}`)
    }
  }
  return listening
}

export function testImage(): string {
  return imageDir('test-site')
}
