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
}

export const sandboxArgs = ['-sandbox', 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny']

export function buildQemuArgs({ vm, accel, hostPort, sandbox, name }: QemuArgsInput): string[] {
  // HVF on Apple silicon cannot map the high PCIe/GIC regions of a 40-bit+ address space.
  const machine = accel === 'hvf' && vm.machine === 'virt' ? 'virt,highmem=off' : vm.machine
  return [
    '-name', name,
    '-machine', machine,
    '-accel', accel,
    '-cpu', accel === 'tcg' ? 'max' : 'host',
    '-m', String(vm.memoryMiB),
    '-smp', String(vm.cpus),
    '-nodefaults',
    '-no-user-config',
    '-display', 'none',
    '-no-reboot',
    '-kernel', vm.kernel,
    '-initrd', vm.initrd,
    '-append', vm.append,
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
    ...(sandbox ? sandboxArgs : []),
  ]
}
