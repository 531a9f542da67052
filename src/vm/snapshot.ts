// Clone mode's template: boot the guest once with its RAM in a file, save its
// device state as soon as it answers, and let every request restore a
// copy-on-write clone of that pristine machine instead of booting.
//
// The template lives in vm.snapshot.dir under a key made of everything that
// shapes the guest (kernel, initrd, disk, QEMU version, the VM settings), so it is
// made again when any of them changes, and reused across restarts otherwise.
//
// What is trusted: a folder that vmcgi's user owns and that nobody else may
// enter (mode 0700, checked at every start; anything else is refused). Inside
// it, each template carries a manifest with the size and sha256 of its two
// files, written when it is saved and checked before it is used: that catches
// a template damaged by a crash, a full disk or a cleaner, not a forgery, which
// only vmcgi's user (or root) could plant there. A template that fails the
// check, or whose first clone fails, is made again once.
//
// Once checked, both files are held open for as long as vmcgi runs, and clones
// are given those very files (by descriptor, on Linux): removing or replacing
// the files later changes nothing for this vmcgi. Clones map the RAM
// privately: they never write to it.

import { createHash } from 'node:crypto'
import {
  closeSync, constants, existsSync, fstatSync, lstatSync, mkdirSync, openSync, readFileSync, readSync, readdirSync,
  renameSync, rmSync, writeFileSync, writeSync,
} from 'node:fs'
import { join } from 'node:path'
import { execa } from 'execa'
import type { FastifyBaseLogger } from 'fastify'
import { isAlive } from '../alive.js'
import { ConfigError } from '../errors.js'
import type { HostProbe } from './host.js'
import { templateMode, type SnapshotFiles } from './modes.js'
import { QemuVm } from './vm.js'

export function snapshotKey(host: HostProbe): string {
  const { vm } = host.config
  const hash = createHash('sha256')
  hash.update(readFileSync(vm.kernel))
  if (vm.initrd) hash.update(readFileSync(vm.initrd))
  hash.update(JSON.stringify({
    qemu: vm.qemu,
    qemuVersion: host.qemuVersion,
    accel: host.accel.accel,
    machine: vm.machine,
    cpu: vm.cpu,
    append: vm.append,
    extraArgs: vm.extraArgs,
    memoryMiB: vm.memoryMiB,
    cpus: vm.cpus,
    guestPort: vm.guestPort,
    disk: host.disk?.identity,
    at: vm.snapshot.at,
  }))
  return hash.digest('hex').slice(0, 16)
}

/** Returns the template's files, booting and saving it first if there is none for this key, or a damaged one. */
export async function prepareSnapshot(host: HostProbe, log: FastifyBaseLogger): Promise<SnapshotFiles> {
  return (await loadOrMakeTemplate(host, log)).files
}

/**
 * Clone mode at start: the template, then its first clone booted by
 * `preflight`. A saved template whose clone fails is discarded and made once
 * more; one just made whose clone fails is refused, naming its folder.
 */
export async function prepareClones(
  host: HostProbe,
  log: FastifyBaseLogger,
  preflight: (host: HostProbe) => HostProbe | Promise<HostProbe>,
): Promise<HostProbe> {
  for (;;) {
    const template = await loadOrMakeTemplate(host, log)
    try {
      return await preflight({ ...host, snapshot: template.files })
    } catch (error) {
      // Not a ConfigError: vmcgi itself failed, not the clone.
      if (!(error instanceof ConfigError)) throw error
      template.close()
      rmSync(template.dir, { recursive: true, force: true })
      if (template.made) {
        throw new ConfigError('vm.snapshot', `a clone of the template just made in ${template.dir} did not boot, and it was removed (${error.message})`)
      }
      log.warn({ dir: template.dir, err: error }, 'a clone of the saved template did not boot; making the template again')
    }
  }
}

interface Template {
  dir: string
  files: SnapshotFiles
  /** Whether it was made by this call, rather than found saved. */
  made: boolean
  /** Closes the descriptors held on its files. */
  close(): void
}

/** A template that is there but cannot be used as it is: it is made again. */
class DamagedTemplate extends Error {}

interface Manifest {
  ram: { bytes: number; sha256: string }
  state: { bytes: number; sha256: string }
}
const manifestName = 'manifest.json'

async function loadOrMakeTemplate(host: HostProbe, log: FastifyBaseLogger): Promise<Template> {
  const root = host.config.vm.snapshot.dir
  makePrivateFolder(root)
  const key = snapshotKey(host)
  const dir = join(root, key)
  removeUnusedTemplates(root, key, log)
  const readOnlyRam = await opensRamReadOnly(host.config.vm.qemu)
  if (existsSync(dir)) {
    try {
      const template = openTemplate(dir, readOnlyRam, false)
      log.info({ dir }, 'reusing the saved template')
      return template
    } catch (error) {
      if (!(error instanceof DamagedTemplate)) throw error
      log.warn({ dir, reason: error.message }, 'the saved template is damaged; making it again')
      rmSync(dir, { recursive: true, force: true })
    }
  }
  await makeTemplate(host, dir, log)
  try {
    return openTemplate(dir, readOnlyRam, true)
  } catch (error) {
    if (!(error instanceof DamagedTemplate)) throw error
    throw new ConfigError('vm.snapshot.dir', `the template just made in ${dir} does not check: ${error.message}`)
  }
}

/**
 * Makes `dir` if it is not there (mode 0700), and refuses it unless it is a
 * folder of vmcgi's own user that no one else may enter: anyone who can write
 * there can make vmcgi serve a guest of their choosing.
 */
function makePrivateFolder(dir: string): void {
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 })
  } catch (error) {
    throw new ConfigError('vm.snapshot.dir', `cannot make the template there: ${(error as Error).message}`)
  }
  const problem = notPrivate(dir)
  if (problem) throw new ConfigError('vm.snapshot.dir', `${dir} ${problem}; vmcgi keeps its templates only in a folder of its own user with mode 0700`)
}

/** Why `path` is not a private folder of this user, or null. */
function notPrivate(path: string): string | null {
  const stat = lstatSync(path)
  if (!stat.isDirectory()) return 'is not a folder'
  const uid = process.getuid?.()
  if (uid !== undefined && stat.uid !== uid) return `is owned by uid ${stat.uid}, not by vmcgi's uid ${uid}`
  if ((stat.mode & 0o077) !== 0) return `has mode ${(stat.mode & 0o777).toString(8)}, open to other users`
  return null
}

/** Whether this QEMU maps a file opened read-only as private, writable RAM (its memory-backend-file has `rom`). */
async function opensRamReadOnly(qemu: string): Promise<boolean> {
  const help = await execa(qemu, ['-object', 'memory-backend-file,help'], { reject: false, timeout: 10_000, stdin: 'ignore' })
  return /^\s*rom=/m.test(help.stdout)
}

/**
 * Opens a saved template's files, checks them against its manifest and keeps
 * them open. The checked descriptors are the ones clones get: on Linux the
 * paths handed on are /proc/self/fd/N, which open the very same files even
 * after their names are removed (elsewhere, the names themselves).
 */
function openTemplate(dir: string, readOnlyRam: boolean, made: boolean): Template {
  const problem = notPrivate(dir)
  if (problem) throw new ConfigError('vm.snapshot.dir', `the template folder ${dir} ${problem}`)
  let manifest: Manifest
  try {
    manifest = JSON.parse(readFileSync(join(dir, manifestName), 'utf8')) as Manifest
  } catch (error) {
    throw new DamagedTemplate(`its ${manifestName} cannot be read: ${(error as Error).message}`)
  }
  const fds: number[] = []
  const close = () => fds.splice(0).forEach((fd) => closeSync(fd))
  try {
    for (const name of ['ram', 'state'] as const) {
      const path = join(dir, name)
      let fd: number
      try {
        fd = openSync(path, constants.O_RDONLY | constants.O_NOFOLLOW)
      } catch (error) {
        throw new DamagedTemplate(`its ${name} cannot be opened: ${(error as Error).message}`)
      }
      fds.push(fd)
      const stat = fstatSync(fd)
      if (!stat.isFile()) throw new DamagedTemplate(`its ${name} is not a file`)
      const expected = manifest[name]
      if (stat.size !== expected?.bytes) throw new DamagedTemplate(`its ${name} has ${stat.size} bytes, not ${expected?.bytes}`)
      if (hashFile(fd, false) !== expected.sha256) throw new DamagedTemplate(`its ${name} does not match its sha256 in ${manifestName}`)
    }
  } catch (error) {
    close()
    throw error
  }
  const [ram, state] = fds as [number, number]
  markInUse(dir)
  const byFd = process.platform === 'linux'
  return {
    dir,
    made,
    close,
    files: {
      ramPath: byFd ? `/proc/self/fd/${ram}` : join(dir, 'ram'),
      statePath: byFd ? `/proc/self/fd/${state}` : join(dir, 'state'),
      readOnlyRam,
    },
  }
}

/**
 * Reads a file through from its start and returns its sha256. With `fill`,
 * every block is written back as it was read: a hole in a sparse file becomes
 * real zeros, so the whole file has its room on the disk. Otherwise a clone
 * reading a hole in a file on a full tmpfs dies of SIGBUS.
 */
function hashFile(fd: number, fill: boolean): string {
  const hash = createHash('sha256')
  const buffer = Buffer.alloc(4 << 20)
  for (let position = 0; ;) {
    const read = readSync(fd, buffer, 0, buffer.length, position)
    if (read === 0) break
    if (fill) writeSync(fd, buffer, 0, read, position)
    hash.update(buffer.subarray(0, read))
    position += read
  }
  return hash.digest('hex')
}

async function makeTemplate(host: HostProbe, dir: string, log: FastifyBaseLogger): Promise<void> {
  // Made in a folder of its own and renamed into place whole, so that a
  // half-made template is never used, even by another vmcgi on the same host.
  const building = `${dir}.${process.pid}.partial`
  try {
    rmSync(building, { recursive: true, force: true })
    mkdirSync(building, { mode: 0o700 })
  } catch (error) {
    throw new ConfigError('vm.snapshot.dir', `cannot make the template there: ${(error as Error).message}`)
  }
  try {
    const partial: SnapshotFiles = { ramPath: join(building, 'ram'), statePath: join(building, 'state'), readOnlyRam: false }
    const template = new QemuVm(host, log, templateMode(partial, join(building, 'qmp.sock'), { at: host.config.vm.snapshot.at }))
    try {
      await template.boot(new AbortController().signal)
      await template.saveSnapshot(AbortSignal.timeout(30_000))
      log.info({ dir, bootMs: template.bootMs }, 'saved the template')
    } catch (error) {
      throw new ConfigError('vm.snapshot', `could not make the template: ${(error as Error).message}`)
    } finally {
      await template.destroy(new Error('the template is saved'))
    }
    let manifest: Manifest
    try {
      manifest = { ram: checksum(partial.ramPath, true), state: checksum(partial.statePath, false) }
    } catch (error) {
      throw new ConfigError('vm.snapshot.dir', `no room for the template in ${dir} (${host.config.vm.memoryMiB} MiB of RAM and its state): ${(error as Error).message}`)
    }
    writeFileSync(join(building, manifestName), `${JSON.stringify(manifest, null, 2)}\n`, { mode: 0o600 })
    markInUse(building)
    try {
      renameSync(building, dir)
    } catch (error) {
      // Another vmcgi finished the same template meanwhile, and wins.
      const { code } = error as NodeJS.ErrnoException
      if (code !== 'ENOTEMPTY' && code !== 'EEXIST') {
        throw new ConfigError('vm.snapshot.dir', `cannot put the template in place: ${(error as Error).message}`)
      }
    }
  } finally {
    rmSync(building, { recursive: true, force: true })
  }
}

function checksum(path: string, fill: boolean): { bytes: number; sha256: string } {
  const fd = openSync(path, fill ? 'r+' : 'r')
  try {
    return { bytes: fstatSync(fd).size, sha256: hashFile(fd, fill) }
  } finally {
    closeSync(fd)
  }
}

// Which templates are in use: each vmcgi that uses one leaves a file named for
// its pid in its folder while it runs. A template whose files name no live
// process is another key's leftover, removed at the next start. A pid reused
// by another process keeps a template a while longer, no worse; and removing
// one in use does not harm its users, who hold its files open.
const inUsePrefix = 'in-use-by-'

const markers = new Set<string>()
function markInUse(dir: string): void {
  const marker = join(dir, `${inUsePrefix}${process.pid}`)
  writeFileSync(marker, '', { mode: 0o600 })
  if (markers.size === 0) process.once('exit', () => markers.forEach((path) => rmSync(path, { force: true })))
  markers.add(marker)
}

function removeUnusedTemplates(root: string, keep: string, log: FastifyBaseLogger): void {
  for (const name of readdirSync(root)) {
    const partial = /^[0-9a-f]{16}\.(\d+)\.partial$/.exec(name)
    const unused = partial
      ? !isAlive(Number(partial[1]))
      : /^[0-9a-f]{16}$/.test(name) && name !== keep && !usersOf(join(root, name)).some(isAlive)
    if (!unused) continue
    rmSync(join(root, name), { recursive: true, force: true })
    log.info({ dir: join(root, name) }, 'removed a template no vmcgi uses')
  }
}

function usersOf(dir: string): number[] {
  try {
    return readdirSync(dir).filter((name) => name.startsWith(inUsePrefix)).map((name) => Number(name.slice(inUsePrefix.length)))
  } catch {
    return []
  }
}
