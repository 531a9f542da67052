// How a VM comes to life, as values QemuVm calls at each step: a cold boot, the template (saved once), or a clone of it.
//
//   boot      QEMU's arguments, nothing more.
//   template  its RAM in a shared file and QMP; once ready, it is reseeded and
//             its device state saved (see snapshot.ts for where and when).
//   clone     the template's RAM file mapped privately, copy-on-write, and QMP;
//             its device state is restored over QMP, then the guest is reseeded.
//
// The template and clone code lives here together: what one saves, the other restores.

import { randomBytes } from 'node:crypto'
import { closeSync, mkdtempSync, openSync, renameSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { FastifyBaseLogger as Logger } from 'fastify'
import { VmcgiError } from '../errors.js'
import type { SerialConsole } from './console.js'
import type { QemuProcess } from './qemu-process.js'
import type { QemuArgsInput } from './qemu-args.js'
import { Qmp, QmpError, waitForMigration } from './qmp.js'

/**
 * A booted guest saved once: RAM in a file, device state in another. From
 * prepareSnapshot, on Linux, both paths are /proc/self/fd/N of descriptors
 * vmcgi holds open from the moment it verified them (see snapshot.ts).
 */
export interface SnapshotFiles {
  ramPath: string
  statePath: string
  /** QEMU opens the RAM file read-only and still maps it private and writable (readonly=on,rom=off, QEMU ≥ 8.2). */
  readOnlyRam: boolean
}

/** One spawn attempt of a VM, as a mode's hooks see it. */
export interface Attempt {
  qemu: QemuProcess
  console: SerialConsole
  log: Logger
}

export interface StartMode {
  /** For the log. */
  readonly name: 'boot' | 'template' | 'clone'
  /** What this mode adds to QEMU's command line. */
  readonly args: Pick<QemuArgsInput, 'memoryFile' | 'qmpSocket' | 'incoming' | 'kernelArgs'>
  /** Whether QEMU may run under -sandbox, where this QEMU has it. */
  readonly sandbox: boolean
  /** Descriptors QEMU inherits as 3, 4, …, opened anew for every spawn; QemuProcess closes them. */
  openInherited(): number[]
  /** Once QEMU is spawned, before its guest is probed. */
  restore(attempt: Attempt, signal: AbortSignal): Promise<void>
  /** What the VM is ready at instead of an HTTP answer, if anything, and what the boot timeout says it did not do. */
  awaitReady?(attempt: Attempt, signal: AbortSignal): Promise<void>
  readonly readyWhen?: string
  /** Runs while the guest is probed, if there is anything to do; the VM is ready once both are done. */
  reseed(attempt: Attempt, signal: AbortSignal): Promise<void> | undefined
  /** Saves a ready VM for clones to restore; only the template has it. */
  save?(attempt: Attempt, signal: AbortSignal): Promise<void>
  /** Once QEMU is gone: removes what the mode made for it. */
  release(): void
}

/** A cold boot. */
export const bootMode: StartMode = {
  name: 'boot',
  args: {},
  sandbox: true,
  openInherited: () => [],
  restore: async () => {},
  reseed: () => undefined,
  release: () => {},
}

/**
 * A template saved before its app (vm.snapshot.at "boot") is booted with this
 * on its kernel's command line; the guest then prints `bootedLine` and starts
 * its app only after its first seed, which only a clone gets.
 */
export const startOnSeedArg = 'vmcgi_start=seed'
export const bootedLine = 'vmcgi: booted'

/**
 * The template: booted once with its RAM in `files.ramPath`, then saved, once
 * it answers (`at: 'ready'`) or once it says it booted, before its app starts
 * (`at: 'boot'`; its first seed, a clone's own, starts the app).
 */
export function templateMode(files: SnapshotFiles, qmpSocket: string, { at }: { at: 'ready' | 'boot' }): StartMode {
  return {
    name: 'template',
    args: { memoryFile: { path: files.ramPath, share: true }, qmpSocket, ...(at === 'boot' ? { kernelArgs: [startOnSeedArg] } : {}) },
    // The template writes its state through `exec:`, which the sandbox's
    // spawn=deny forbids. It boots vmcgi's own image and never serves a request.
    sandbox: false,
    openInherited: () => [],
    restore: async () => {},
    ...(at === 'boot'
      ? {
          awaitReady: async (attempt: Attempt, signal: AbortSignal) => void await attempt.console.waitFor([bootedLine], signal),
          readyWhen: `print "${bootedLine}" (vm.snapshot.at "boot" needs a guest that knows ${startOnSeedArg})`,
        }
      : {}),
    reseed: () => undefined,
    save: (attempt, signal) => saveTemplate(files, qmpSocket, attempt, signal, { reseedFirst: at === 'ready' }),
    release: () => rmSync(qmpSocket, { force: true }),
  }
}

/** A clone of the template, restored instead of booted, and reseeded unless `reseed` is false. */
export function cloneMode(files: SnapshotFiles, { reseed, at }: { reseed: boolean; at: 'ready' | 'boot' }): StartMode {
  const qmpSocket = join(runtimeDir(), `${randomBytes(6).toString('hex')}.qmp`)
  // QEMU opens the RAM file by its path. On Linux it is given its own
  // descriptor on the file instead (its 4), and opens /proc/self/fd/4: the very
  // file vmcgi verified, even if that path was removed or replaced since.
  const ramPath = process.platform === 'linux' ? `/proc/self/fd/${ramFd}` : files.ramPath
  return {
    name: 'clone',
    args: { memoryFile: { path: ramPath, share: false, readonly: files.readOnlyRam }, qmpSocket, incoming: true },
    sandbox: true,
    // The device state on descriptor 3 (restoreClone reads it from there), the RAM file on 4.
    openInherited: () => {
      // Each opened anew: the state is read from its start, at an offset of this clone's own.
      const state = openTemplateFile(files.statePath)
      try {
        return [state, openTemplateFile(files.ramPath)]
      } catch (error) {
        closeSync(state)
        throw error
      }
    },
    restore: (attempt, signal) => restoreClone(qmpSocket, attempt, signal),
    // A template saved once it answered is restored answering: its reseed
    // (which the guest answers from the same machine state), if any, is all a
    // clone waits for. A probe would cost what the request costs, on a single
    // vCPU with an empty translation cache, and would make clones differ by
    // how many probes each took. A template saved before its app is probed
    // as a boot is.
    ...(at === 'ready' ? { awaitReady: async () => {}, readyWhen: 'answer its reseed' } : {}),
    reseed: reseed ? reseedGuest : () => undefined,
    release: () => rmSync(qmpSocket, { force: true }),
  }
}

/** A template file that cannot be opened fails the clone as one that could not be restored. */
function openTemplateFile(path: string): number {
  try {
    return openSync(path, 'r')
  } catch (error) {
    throw new VmcgiError('RESTORE_FAILED', `the template's file ${path} cannot be opened: ${(error as Error).message}`, { cause: error })
  }
}

/** A private folder (mkdtemp makes it 0700) for this process's QMP sockets, removed when vmcgi exits. */
let runtime: string | undefined
function runtimeDir(): string {
  if (runtime) return runtime
  const dir = mkdtempSync(join(tmpdir(), 'vmcgi-run-'))
  process.once('exit', () => rmSync(dir, { recursive: true, force: true }))
  runtime = dir
  return dir
}

/** The descriptors on which a clone's QEMU finds the template's device state and RAM: its inherited ones. */
const stateFd = 3
const ramFd = 4

/**
 * Saves a booted template: its RAM is already in the shared file, so only the
 * device state is written (x-ignore-shared), to a temporary file renamed into
 * place once complete. The template keeps running; stop it afterwards.
 */
async function saveTemplate(
  files: SnapshotFiles, qmpSocket: string, attempt: Attempt, signal: AbortSignal, { reseedFirst }: { reseedFirst: boolean },
): Promise<void> {
  const partial = `${files.statePath}.partial`
  // A young kernel reseeds its CRNG once its seed is a second old, from the
  // timing jitter it has seen (crng_has_old_seed in drivers/char/random.c),
  // so clones of a template saved with an old seed would drift apart by
  // chance within their first request. Reseeded now, they stay identical
  // until vmcgi reseeds each one: a single mechanism, which tests can show.
  // Not a template saved before its app: its first seed starts the app.
  if (reseedFirst) await reseedGuest(attempt, signal, { beforeSave: true })
  const qmp = await Qmp.connect(qmpSocket, signal)
  try {
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] })
    // Saved while running, so that every clone starts running as soon as it is restored.
    await qmp.execute('migrate', { uri: `exec:cat > '${partial.replaceAll("'", "'\\''")}'` })
    await waitForMigration(qmp, signal)
  } finally {
    qmp.close()
  }
  renameSync(partial, files.statePath)
}

/**
 * Hands a clone the template's device state on descriptor 3 and waits until
 * it is loaded. Its RAM is the template's file, so only device state is in
 * the stream (x-ignore-shared). The template was saved running, so the clone
 * runs as soon as it is restored. QEMU refusing to restore is RESTORE_FAILED:
 * QEMU did start.
 */
async function restoreClone(qmpSocket: string, { log }: Attempt, signal: AbortSignal): Promise<void> {
  const qmp = await Qmp.connect(qmpSocket, signal)
  try {
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] })
    await qmp.execute('migrate-incoming', { uri: `fd:${stateFd}` })
    // Console input sent before the UART's state is loaded would be lost.
    await waitForMigration(qmp, signal)
  } catch (error) {
    if (!(error instanceof QmpError)) throw error
    log.warn({ qmp: { command: error.command, error: error.desc } }, 'QEMU could not restore the clone')
    throw new VmcgiError('RESTORE_FAILED', `the clone could not be restored: ${error.message}`, { cause: error })
  } finally {
    qmp.close()
  }
}

/**
 * Clones of one template share its RNG state and clock. Before a clone sees
 * a request, the guest's agent (images/agent.c) takes fresh entropy from here,
 * reseeds its kernel's CRNG, sets the clock, and says so on the console, or
 * says that it could not: then the clone fails at once, as one that could not
 * be restored, rather than at the boot timeout. The template's seed, just
 * before it is saved, ends with "save": it is not a clone's restore, and a
 * guest that tells its app of each restore (--restore-signal) must not count it.
 */
async function reseedGuest({ qemu, console }: Attempt, signal: AbortSignal, { beforeSave = false } = {}): Promise<void> {
  const nonce = randomBytes(8).toString('hex')
  const seed = randomBytes(32).toString('hex')
  const failed = `vmcgi: reseed failed ${nonce}`
  const answer = console.waitFor([`vmcgi: reseeded ${nonce}`, failed], signal)
  qemu.stdin.write(`vmcgi-seed ${seed} ${Math.floor(Date.now() / 1000)} ${nonce}${beforeSave ? ' save' : ''}\n`)
  if ((await answer) === failed) {
    throw new VmcgiError('RESTORE_FAILED', 'the guest agent could not reseed its RNG or set its clock')
  }
}
