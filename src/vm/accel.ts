// Which accelerator a VM runs on, and why. The decision is a pure function of
// facts about the host, so that it can be tested for every host there is;
// gathering the facts is the only part that touches the machine.

import { constants, accessSync, existsSync } from 'node:fs'
import type { AccelChoice } from '../config.js'

export type Accel = 'kvm' | 'hvf' | 'tcg'
export type GuestArch = 'aarch64' | 'x86_64'

export interface HostFacts {
  platform: NodeJS.Platform
  /** Node's name for the host CPU: 'arm64', 'x64', ... */
  cpuArch: string
  /** null when /dev/kvm can be opened read-write and is a real KVM; otherwise why not. */
  kvmProblem: string | null
}

export interface AccelDecision {
  accel: Accel
  reason: string
}

const nodeArchOf: Record<GuestArch, string> = { aarch64: 'arm64', x86_64: 'x64' }

/** The guest's architecture, read from the emulator's name (qemu-system-aarch64). */
export function guestArchOf(qemuPath: string): GuestArch {
  return /x86_64/.test(qemuPath.split('/').pop() ?? '') ? 'x86_64' : 'aarch64'
}

export function chooseAccel(requested: AccelChoice, guest: GuestArch, host: HostFacts): AccelDecision {
  const native = host.cpuArch === nodeArchOf[guest]
  if (requested === 'tcg') return { accel: 'tcg', reason: 'vm.accel is tcg' }
  if (requested === 'kvm') return { accel: 'kvm', reason: 'vm.accel is kvm' }
  if (requested === 'hvf') return { accel: 'hvf', reason: 'vm.accel is hvf' }

  if (host.platform === 'darwin') {
    return native
      ? { accel: 'hvf', reason: `macOS on ${host.cpuArch} runs ${guest} guests with Hypervisor.framework` }
      : { accel: 'tcg', reason: `hvf cannot run ${guest} guests on this ${host.cpuArch} Mac` }
  }
  if (host.platform !== 'linux') return { accel: 'tcg', reason: `no accelerator known on ${host.platform}` }
  if (!native) return { accel: 'tcg', reason: `KVM cannot run ${guest} guests on this ${host.cpuArch} host` }
  if (host.kvmProblem) return { accel: 'tcg', reason: host.kvmProblem }
  return { accel: 'kvm', reason: `/dev/kvm is usable and the guest is ${guest} like the host` }
}

/** Looks at /dev/kvm without starting a VM. */
export function readHostFacts(): HostFacts {
  return { platform: process.platform, cpuArch: process.arch, kvmProblem: process.platform === 'linux' ? kvmProblem() : 'not Linux' }
}

function kvmProblem(): string | null {
  if (!existsSync('/dev/kvm')) return '/dev/kvm does not exist'
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK)
  } catch {
    return '/dev/kvm is not readable and writable by this user (add it to the kvm group)'
  }
  // A paravirtual KVM (kvm_pvm) opens like the real thing but cannot run
  // ordinary guests: they hang early in boot.
  if (existsSync('/sys/module/kvm_pvm')) return '/dev/kvm is the paravirtual kvm_pvm, which cannot run ordinary guests'
  return null
}
