// Clone mode's template: boot the guest once with its RAM in a file, save its
// device state as soon as it answers, and let every request restore a
// copy-on-write clone of that pristine machine instead of booting.
//
// The template lives in vm.snapshot.dir under a key made of everything that
// shapes the guest (kernel, initrd, QEMU version, the VM settings), so it is
// made again when any of them changes, and reused across restarts otherwise.
// Clones map the RAM file privately: they never write to it.

import { createHash } from 'node:crypto'
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import type { FastifyBaseLogger } from 'fastify'
import { ConfigError } from '../errors.js'
import type { HostProbe } from './host.js'
import { templateMode, type SnapshotFiles } from './modes.js'
import { QemuVm } from './vm.js'

export function snapshotKey(host: HostProbe): string {
  const { vm } = host.config
  const hash = createHash('sha256')
  hash.update(readFileSync(vm.kernel))
  hash.update(readFileSync(vm.initrd))
  hash.update(JSON.stringify({
    qemu: vm.qemu,
    qemuVersion: host.qemuVersion,
    accel: host.accel.accel,
    machine: vm.machine,
    append: vm.append,
    memoryMiB: vm.memoryMiB,
    cpus: vm.cpus,
    guestPort: vm.guestPort,
  }))
  return hash.digest('hex').slice(0, 16)
}

/** Returns the template's files, booting and saving it first if there is none for this key. */
export async function prepareSnapshot(host: HostProbe, log: FastifyBaseLogger): Promise<SnapshotFiles> {
  const key = snapshotKey(host)
  const dir = join(host.config.vm.snapshot.dir, key)
  const files: SnapshotFiles = { ramPath: join(dir, 'ram'), statePath: join(dir, 'state') }
  const complete = () => existsSync(files.ramPath) && existsSync(files.statePath)
  if (complete()) {
    log.info({ dir }, 'reusing the saved template')
    return files
  }

  // Made in a folder of its own and renamed into place whole, so that a
  // half-made template is never used, even by another vmcgi on the same host.
  const building = `${dir}.${process.pid}.partial`
  try {
    rmSync(building, { recursive: true, force: true })
    mkdirSync(building, { recursive: true })
  } catch (error) {
    throw new ConfigError('vm.snapshot.dir', `cannot make the template there: ${(error as Error).message}`)
  }
  const partial: SnapshotFiles = { ramPath: join(building, 'ram'), statePath: join(building, 'state') }
  const template = new QemuVm(host, log, templateMode(partial, join(building, 'qmp.sock')))
  try {
    await template.boot(new AbortController().signal)
    await template.saveSnapshot(AbortSignal.timeout(30_000))
    log.info({ dir, bootMs: template.bootMs }, 'saved the template')
  } catch (error) {
    rmSync(building, { recursive: true, force: true })
    throw new ConfigError('vm.snapshot', `could not make the template: ${(error as Error).message}`)
  } finally {
    await template.destroy(new Error('the template is saved'))
  }
  try {
    // Another vmcgi may have finished the same template meanwhile, and wins;
    // one that lost a file (to a cleaner of temporary folders, say) is replaced.
    if (!complete()) rmSync(dir, { recursive: true, force: true })
    renameSync(building, dir)
  } catch (error) {
    const { code } = error as NodeJS.ErrnoException
    if ((code !== 'ENOTEMPTY' && code !== 'EEXIST') || !complete()) {
      throw new ConfigError('vm.snapshot.dir', `cannot put the template in place: ${(error as Error).message}`)
    }
  } finally {
    rmSync(building, { recursive: true, force: true })
  }
  return files
}
