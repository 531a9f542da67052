import { describe, expect, it } from 'vitest'
import { chooseAccel, guestArchOf, type HostFacts } from '../../../src/vm/accel.js'

const linuxArm: HostFacts = { platform: 'linux', cpuArch: 'arm64', kvmProblem: null }
const linuxX64: HostFacts = { platform: 'linux', cpuArch: 'x64', kvmProblem: null }
const macArm: HostFacts = { platform: 'darwin', cpuArch: 'arm64', kvmProblem: 'not Linux' }

describe('chooseAccel', () => {
  it('uses KVM for an aarch64 guest on a Raspberry Pi with a working /dev/kvm', () => {
    expect(chooseAccel('auto', 'aarch64', linuxArm).accel).toBe('kvm')
  })

  it('never uses KVM for an aarch64 guest on an x86 host, even with /dev/kvm', () => {
    const decision = chooseAccel('auto', 'aarch64', linuxX64)
    expect(decision.accel).toBe('tcg')
    expect(decision.reason).toMatch(/aarch64.*x64/)
  })

  it('is not fooled by a paravirtual KVM that opens but cannot run guests', () => {
    const pvm = { ...linuxX64, kvmProblem: '/dev/kvm is the paravirtual kvm_pvm, which cannot run ordinary guests' }
    const decision = chooseAccel('auto', 'x86_64', pvm)
    expect(decision).toEqual({ accel: 'tcg', reason: pvm.kvmProblem })
  })

  it('falls back to TCG when /dev/kvm is missing or closed to this user', () => {
    expect(chooseAccel('auto', 'aarch64', { ...linuxArm, kvmProblem: '/dev/kvm does not exist' }).accel).toBe('tcg')
  })

  it('uses HVF on an Apple silicon Mac', () => {
    expect(chooseAccel('auto', 'aarch64', macArm).accel).toBe('hvf')
    expect(chooseAccel('auto', 'x86_64', macArm).accel).toBe('tcg')
  })

  it('honours an explicit choice', () => {
    expect(chooseAccel('tcg', 'aarch64', linuxArm).accel).toBe('tcg')
    expect(chooseAccel('kvm', 'aarch64', linuxX64).accel).toBe('kvm')
    expect(chooseAccel('hvf', 'aarch64', linuxArm).accel).toBe('hvf')
  })
})

describe('guestArchOf', () => {
  it('reads the architecture from the emulator name', () => {
    expect(guestArchOf('/usr/bin/qemu-system-aarch64')).toBe('aarch64')
    expect(guestArchOf('/opt/homebrew/bin/qemu-system-x86_64')).toBe('x86_64')
  })
})
