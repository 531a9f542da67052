// Turns a container image into a vmcgi guest, in DIR:
//
//   Image               the guest kernel for the image's architecture (images/kernel.sh)
//   root-ID.erofs       the image flattened into a read-only erofs disk, ID its config digest
//   initramfs-SHA.cpio.gz  vmcgi's init (images/image-init.sh), /dev/console and /vmcgi/app
//   vmcgi.json          a config that serves it: `vmcgi --config DIR/vmcgi.json`
//
// The flattening and the disk are made once per image (its config digest,
// which covers every layer) and cached in the images cache beside the
// kernel's. umoci applies the layers, whiteouts and opaque directories as
// the OCI image spec says, with owners and modes, and never writes through
// a link out of the root. A new image is a new disk file, with a new name:
// a VM that holds the old one open never sees it change.

import { createHash, randomBytes } from 'node:crypto'
import {
  closeSync, constants, copyFileSync, existsSync, linkSync, lstatSync, mkdirSync, openSync, readdirSync, readFileSync,
  renameSync, rmSync, statSync, writeFileSync,
} from 'node:fs'
import { arch as hostArch } from 'node:os'
import { join, resolve } from 'node:path'
import { execa } from 'execa'
import { appFor, encodeApp, type App, type RunOverrides } from './app.js'
import { cpioArchive } from './cpio.js'
import { ImageError } from './errors.js'
import { readInsideRoot } from './root.js'
import { copyToLayout, parseSource, readImageConfig, type GuestArch, type ImageConfigBlob, type Source } from './source.js'
import { makeWorkDir, removeAbandonedWorkDirs } from './work-dir.js'

export interface BuildOptions {
  source: string
  out: string
  arch?: GuestArch
  memoryMiB: number
  readinessPath: string
  /** Clone mode, with the template saved once the app answers or before it starts; cold boots without. */
  clone?: 'ready' | 'boot'
  /** With clone 'ready': the signal the app is sent in each clone (the guest's number). */
  restoreSignal?: number
  overrides: RunOverrides
  /** The repository's images/ folder: the recipes, and out/cache. */
  imagesDir: string
  log: (line: string) => void
}

export interface BuiltGuest {
  configPath: string
  arch: GuestArch
  imageId: string
  app: App
  diskBytes: number
  initramfsBytes: number
}

/** How the guest of each architecture is started: the emulator, the machine and the kernel's command line. */
const machines: Record<GuestArch, { qemu: string; machine: string; append: string }> = {
  // reboot=t: with ACPI off, a reset through the keyboard controller's triple
  // fault is what makes QEMU (-no-reboot) exit when the app does.
  x86_64: { qemu: 'qemu-system-x86_64', machine: 'microvm,acpi=off,rtc=on', append: 'console=ttyS0 quiet no_timer_check reboot=t' },
  aarch64: { qemu: 'qemu-system-aarch64', machine: 'virt', append: 'console=ttyAMA0 quiet' },
}

export async function buildImageGuest(options: BuildOptions): Promise<BuiltGuest> {
  const { log } = options
  const out = resolve(options.out)
  const source = parseSource(options.source)
  if (process.getuid?.() !== 0) {
    throw new ImageError('from-image', 'building from an image needs root: the disk keeps the owners of the image\'s files')
  }
  log(`==> reading ${source.text}`)
  const blob = await readImageConfig(source, options.arch, hostGuestArch())
  const shortId = blob.id.slice(0, 12)
  log(`    image ${shortId}, ${blob.config.os ?? 'linux'}/${blob.config.architecture}: the ${blob.arch} guest`)

  const cache = join(options.imagesDir, 'out', 'cache', 'images')
  const flat = await flattenedImage(source, blob, cache, log)
  const app = {
    ...appFor(blob.config.config ?? {}, options.overrides, flat.etc),
    ...(options.restoreSignal !== undefined ? { restoreSignal: options.restoreSignal } : {}),
  }
  log(`    runs ${JSON.stringify(app.argv)} as ${app.user.uid}:${app.user.gid} in ${app.cwd}, on port ${app.port}`)

  mkdirSync(out, { recursive: true })
  await guestFiles(options.imagesDir, blob.arch, out, log)

  log('==> writing the initramfs and vmcgi.json')
  const initramfs = cpioArchive([
    { type: 'file', path: 'init', mode: 0o755, data: readFileSync(join(out, 'image-init')) },
    { type: 'dir', path: 'dev', mode: 0o755 },
    { type: 'char', path: 'dev/console', mode: 0o600, major: 5, minor: 1 },
    ...['proc', 'sys', 'lower', 'rw', 'newroot', 'vmcgi'].map((path) => ({ type: 'dir' as const, path, mode: 0o755 })),
    { type: 'file', path: 'vmcgi/app', mode: 0o644, data: encodeApp(app) },
  ])
  // Named for its contents, as the disk is: a vmcgi serving the last build
  // boots each VM from its own initramfs, not the app spec of this one.
  const initramfsName = `initramfs-${createHash('sha256').update(initramfs).digest('hex').slice(0, 12)}.cpio.gz`
  writeAtomically(join(out, initramfsName), initramfs)

  const diskName = `root-${shortId}.erofs`
  placeDisk(flat.disk, join(out, diskName))
  const { qemu, machine, append } = machines[blob.arch]
  const config = {
    vm: {
      qemu, machine, append,
      kernel: 'Image',
      initrd: initramfsName,
      disk: diskName,
      memoryMiB: options.memoryMiB,
      guestPort: app.port,
      ...(options.clone ? { snapshot: { enabled: true, at: options.clone } } : {}),
    },
    // A language runtime starts in seconds under emulation, not in the
    // default guest's fraction of one. vmcgi's init prints the ready line as
    // soon as the app listens, which starts a probe at once: polling is only
    // the fallback, and a slow one. Probes every 20 ms, most of them sent
    // before the guest's network is up and retried by slirp later, would fill
    // a small listen backlog (Python's is 5) the moment the app listens, and
    // the request's own SYN would wait for slirp's retry, 6 s.
    readiness: { path: options.readinessPath, timeoutMs: 30000, intervalMs: 1000 },
  }
  const configPath = join(out, 'vmcgi.json')
  writeAtomically(configPath, Buffer.from(`${JSON.stringify(config, null, 2)}\n`))
  // Disks of earlier versions: a vmcgi still serving one holds it open.
  for (const name of readdirSync(out)) {
    const earlier = /^root-[0-9a-f]{12}\.erofs$/.test(name) || /^initramfs-[0-9a-f]{12}\.cpio\.gz$/.test(name)
    if (earlier && name !== diskName && name !== initramfsName) rmSync(join(out, name), { force: true })
  }
  log(`==> ${configPath}`)
  return { configPath, arch: blob.arch, imageId: blob.id, app, diskBytes: statSync(flat.disk).size, initramfsBytes: initramfs.length }
}

/**
 * The image's disk and its /etc/passwd and /etc/group, from the cache or made
 * now. The cache is this user's own, mode 0700: root unpacks an image's
 * setuid files and device nodes there, and trusts what it finds there later.
 * An entry is complete or absent (renamed into place); of two builds of one
 * image at once, the second to finish keeps the first's.
 */
async function flattenedImage(source: Source, blob: ImageConfigBlob, cache: string, log: (line: string) => void) {
  privateFolder(cache)
  for (const name of removeAbandonedWorkDirs(cache)) log(`    removed ${join(cache, name)}, left by a build that did not finish`)
  const dir = join(cache, blob.id)
  if (!existsSync(join(dir, 'root.erofs'))) {
    log('==> flattening the image into an erofs disk (once per image)')
    const work = makeWorkDir(cache)
    try {
      const layout = join(work, 'layout')
      const rootfs = join(work, 'rootfs')
      await copyToLayout(source, blob.arch, layout)
      // What was copied must be what was read: a tag moved, or an archive
      // changed, in between would otherwise be cached as the image read.
      const copied = copiedConfigDigest(layout)
      if (copied !== `sha256:${blob.id}`) {
        throw new ImageError('from-image', `${source.text} changed while it was read (config ${copied}, not sha256:${blob.id}); build again`)
      }
      await tool('umoci', ['raw', 'unpack', '--image', `${layout}:image`, rootfs], 'umoci (Debian: apt-get install umoci)')
      const built = join(work, 'built')
      mkdirSync(built)
      for (const name of ['passwd', 'group']) writeFileSync(join(built, name), readInsideRoot(rootfs, `/etc/${name}`) ?? '')
      // lz4hc: about two thirds of the plain size, and cheap to read even under emulation.
      await tool('mkfs.erofs', ['-zlz4hc', '--quiet', join(built, 'root.erofs'), rootfs], 'mkfs.erofs (Debian: apt-get install erofs-utils)')
      if (existsSync(dir) && !existsSync(join(dir, 'root.erofs'))) rmSync(dir, { recursive: true, force: true })
      try {
        renameSync(built, dir)
      } catch (error) {
        const code = (error as NodeJS.ErrnoException).code
        if ((code !== 'ENOTEMPTY' && code !== 'EEXIST') || !existsSync(join(dir, 'root.erofs'))) throw error
      }
    } finally {
      rmSync(work, { recursive: true, force: true })
    }
  } else {
    log(`==> reusing the flattened image ${dir}`)
  }
  return {
    disk: join(dir, 'root.erofs'),
    etc: { passwd: readFileSync(join(dir, 'passwd'), 'utf8'), group: readFileSync(join(dir, 'group'), 'utf8') },
  }
}

/**
 * The kernel and the init for `arch`, into `out`: built by their recipes
 * (cached), or, where the recipes are not installed (the Docker image), the
 * ones this installation ships in images/out/ARCH/.
 */
async function guestFiles(imagesDir: string, arch: GuestArch, out: string, log: (line: string) => void): Promise<void> {
  if (existsSync(join(imagesDir, 'kernel.sh'))) {
    await runRecipe(imagesDir, 'kernel.sh', arch, out)
    await runRecipe(imagesDir, 'image-init.sh', arch, out)
    return
  }
  const shipped = join(imagesDir, 'out', arch)
  for (const name of ['Image', 'image-init']) {
    if (!existsSync(join(shipped, name))) {
      throw new ImageError('arch', `this installation has no ${arch} guest to run the image on (no ${join(shipped, name)}, and no recipe to build one)`)
    }
    copyFileSync(join(shipped, name), join(out, name))
  }
  log(`==> the ${arch} kernel and init of this installation (${shipped})`)
}

async function runRecipe(imagesDir: string, recipe: string, arch: GuestArch, out: string): Promise<void> {
  const result = await execa('bash', [join(imagesDir, recipe), '--arch', arch, '--out', out], { stdout: 'inherit', stderr: 'inherit', reject: false })
  if (result.failed) throw new Error(`images/${recipe} failed (exit ${result.exitCode})`)
}

async function tool(file: string, args: string[], install: string): Promise<void> {
  const result = await execa(file, args, { reject: false, all: true })
  if ((result as { code?: string }).code === 'ENOENT') throw new ImageError('from-image', `${install.split(' ')[0]} is not installed: ${install}`)
  if (result.failed) throw new Error(`${file} failed: ${(result.all ?? '').trim().split('\n').slice(-5).join('\n') || result.shortMessage}`)
}

/** A hard link to the cached disk (a copy across file systems); never the old file written over. */
function placeDisk(cached: string, target: string): void {
  if (existsSync(target) && statSync(target).size === statSync(cached).size) return // the same name is the same image
  const partial = partialName(target)
  try {
    linkSync(cached, partial)
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EXDEV') throw error
    copyFileSync(cached, partial, constants.COPYFILE_EXCL)
  }
  renameSync(partial, target)
}

/** Written to a new file of a random name (never through a link planted in --out), then renamed into place. */
function writeAtomically(path: string, data: Buffer): void {
  const partial = partialName(path)
  const fd = openSync(partial, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o644)
  try {
    writeFileSync(fd, data)
  } finally {
    closeSync(fd)
  }
  renameSync(partial, path)
}

function partialName(path: string): string {
  return `${path}.${randomBytes(6).toString('hex')}.partial`
}

/** Makes `dir` (mode 0700) or checks it is this user's own and no one else's to write or enter. */
function privateFolder(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 })
  const stat = lstatSync(dir)
  if (!stat.isDirectory() || stat.uid !== process.getuid?.() || (stat.mode & 0o077) !== 0) {
    throw new ImageError('from-image', `the image cache ${dir} must be a folder of this user's own, mode 0700 (it is not: remove it, or chmod 700 it)`)
  }
}

/** The config digest of the one image in an OCI layout that copyToLayout wrote. */
function copiedConfigDigest(layout: string): string {
  const index = JSON.parse(readFileSync(join(layout, 'index.json'), 'utf8')) as { manifests: { digest: string }[] }
  const digest = index.manifests[0]?.digest ?? ''
  const manifest = JSON.parse(readFileSync(join(layout, 'blobs', ...digest.split(':')), 'utf8')) as { config?: { digest?: string } }
  return manifest.config?.digest ?? 'none'
}

function hostGuestArch(): GuestArch {
  return hostArch() === 'arm64' ? 'aarch64' : 'x86_64'
}

