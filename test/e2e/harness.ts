// Starts the real vmcgi CLI (dist/main.js, through test/support/vmcgi.ts)
// against the real guest image. Every vmcgi started here is stopped, and its
// VMs checked gone, when the test file ends.

import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { request } from 'undici'
import { afterAll, expect } from 'vitest'
import { qemuProcesses } from '../support/proc.js'
import { mainJs, repo, spawnVmcgi, type VmcgiProcess } from '../support/vmcgi.js'

export { mainJs, repo }

export function imageDir(name = 'aarch64'): string {
  const dir = join(repo, 'images/out', name)
  if (!existsSync(join(dir, 'Image')) || !existsSync(join(dir, 'initramfs.cpio.gz'))) {
    throw new Error(`no guest image in ${dir}: run \`npm run images\` first`)
  }
  return dir
}

export interface Vmcgi extends Omit<VmcgiProcess, 'stop'> {
  /** Stops vmcgi and checks that none of its QEMU processes outlived it; idempotent. */
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

/** Starts vmcgi with writeConfig(overrides, image); it is stopped when the test file ends, if not before. */
export async function startVmcgi(overrides: Record<string, Section> = {}, image?: string): Promise<Vmcgi> {
  const started = await spawnVmcgi(writeConfig(overrides, image))
  let stopped: Promise<void> | undefined
  const vmcgi: Vmcgi = {
    ...started,
    stop: () => (stopped ??= (async () => {
      const outlived = await started.stop()
      running.delete(vmcgi)
      // Nothing this vmcgi started may outlive it. expect.poll is for tests only, and this also runs in afterAll.
      expect(outlived).toEqual([])
    })()),
  }
  running.add(vmcgi)
  return vmcgi
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

/** Every qemu-system process on the machine, as "pid command", for the end-of-file check. */
export async function allQemuProcesses(): Promise<string[]> {
  return (await qemuProcesses()).map((qemu) => `${qemu.pid} ${qemu.command}`)
}

export async function readGuestFile(path: string): Promise<string> {
  return readFile(join(repo, path), 'utf8')
}

export function testImage(): string {
  return imageDir('test-site')
}
