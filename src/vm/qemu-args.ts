// Builds QEMU's command line for one VM. Pure: no I/O, so every flag can be
// checked in a unit test.

import type { Config } from '../config.js'
import type { Accel } from './accel.js'

export interface QemuArgsInput {
  vm: Config['vm']
  accel: Accel
  /** Host port on 127.0.0.1 forwarded to vm.guestPort. */
  hostPort: number
  /** Whether this QEMU build accepts -sandbox (it needs libseccomp). */
  sandbox: boolean
  name: string
  /**
   * Clone mode: guest RAM lives in this file, shared (the template writes it)
   * or private copy-on-write (a clone reads it and never writes it back).
   * `readonly`: QEMU opens the file read-only (readonly=on), and maps it
   * writable all the same (rom=off, QEMU ≥ 8.2; before, readonly=on maps the
   * guest's RAM read-only, so it is not asked for there).
   */
  memoryFile?: { path: string; share: boolean; readonly?: boolean }
  /** A unix socket for QMP, to pause, snapshot and restore. */
  qmpSocket?: string
  /**
   * An inherited, connected socket for a second QMP monitor, on which QEMU
   * announces its SHUTDOWN before it closes the guest's connections.
   */
  eventsFd?: number
  /** A clone: start waiting for the template's device state, sent over QMP's migrate-incoming. */
  incoming?: boolean
  /** Where QEMU opens vm.disk (see disk.ts), when there is one. */
  diskPath?: string
  /** Words added to the kernel's command line after vm.append (a template's `vmcgi_start=seed`). */
  kernelArgs?: readonly string[]
}

export const sandboxArgs = ['-sandbox', 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny']

export function buildQemuArgs({ vm, accel, hostPort, sandbox, name, memoryFile, qmpSocket, eventsFd, incoming, diskPath, kernelArgs = [] }: QemuArgsInput): string[] {
  const append = [vm.append, ...kernelArgs].filter(Boolean).join(' ')
  // HVF on Apple silicon cannot map the high PCIe/GIC regions of a 40-bit+ address space.
  const [type, ...properties] = vm.machine.split(',')
  let machine = accel === 'hvf' && type === 'virt' && !properties.some((property) => property.startsWith('highmem='))
    ? `${vm.machine},highmem=off`
    : vm.machine
  if (memoryFile) machine += ',memory-backend=mem0'
  return [
    '-name', name,
    '-machine', machine,
    '-accel', accel,
    '-cpu', vm.cpu || (accel === 'tcg' ? 'max' : 'host'),
    '-m', String(vm.memoryMiB),
    '-smp', String(vm.cpus),
    '-nodefaults',
    '-no-user-config',
    '-display', 'none',
    '-no-reboot',
    '-kernel', vm.kernel,
    ...(vm.initrd ? ['-initrd', vm.initrd] : []),
    ...(append ? ['-append', append] : []),
    // The serial console goes to stdout, where vmcgi keeps its tail; signal=off
    // so that a stray ^C on the console cannot stop QEMU.
    '-chardev', 'stdio,id=console,signal=off',
    '-serial', 'chardev:console',
    // restrict=on: the guest reaches neither the host nor the internet, only
    // its forwarded port is reachable, and only from 127.0.0.1.
    '-netdev', `user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:${hostPort}-:${vm.guestPort}`,
    '-device', 'virtio-net-device,netdev=net0',
    // Without a hardware RNG a fresh guest waits about a second for entropy on its first read.
    '-object', 'rng-random,id=rng0,filename=/dev/urandom',
    '-device', 'virtio-rng-device,rng=rng0',
    // The guest's /dev/vda, read-only: every VM shares the one file, and
    // QEMU takes a shared lock on it that a writer would be refused.
    ...(diskPath
      ? ['-drive', `file=${diskPath.replaceAll(',', ',,')},if=none,format=raw,readonly=on,id=disk0`, '-device', 'virtio-blk-device,drive=disk0']
      : []),
    ...(memoryFile
      ? ['-object', `memory-backend-file,id=mem0,size=${vm.memoryMiB}M,mem-path=${memoryFile.path},share=${memoryFile.share ? 'on' : 'off'}${memoryFile.readonly ? ',readonly=on,rom=off' : ''}`]
      : []),
    ...(qmpSocket ? ['-qmp', `unix:${qmpSocket},server=on,wait=off`] : []),
    ...(eventsFd !== undefined ? ['-chardev', `socket,id=events,fd=${eventsFd}`, '-mon', 'chardev=events,mode=control'] : []),
    ...(incoming ? ['-incoming', 'defer'] : []),
    ...(sandbox ? sandboxArgs : []),
    ...vm.extraArgs,
  ]
}
