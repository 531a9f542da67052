import { describe, expect, it } from 'vitest'
import { buildQemuArgs, sandboxArgs } from '../../../src/vm/qemu-args.js'
import { fakeConfig } from '../../helpers/fixtures.js'

/** The value after the nth (from 1) occurrence of `flag`. */
function valueOf(args: string[], flag: string, nth = 1): string | undefined {
  let index = -1
  for (let seen = 0; seen < nth; seen++) {
    index = args.indexOf(flag, index + 1)
    if (index === -1) return undefined
  }
  return args[index + 1]
}

describe('buildQemuArgs', () => {
  it('boots the configured kernel with no defaults, no display and no reboot', () => {
    const { vm } = fakeConfig({ vm: { memoryMiB: 256, cpus: 2, append: 'console=ttyAMA0' } })
    const args = buildQemuArgs({ vm, accel: 'tcg', hostPort: 40000, sandbox: true, name: 'vm-1' })
    expect(valueOf(args, '-machine')).toBe('virt')
    expect(valueOf(args, '-kernel')).toBe(vm.kernel)
    expect(valueOf(args, '-initrd')).toBe(vm.initrd)
    expect(valueOf(args, '-append')).toBe('console=ttyAMA0')
    expect(valueOf(args, '-m')).toBe('256')
    expect(valueOf(args, '-smp')).toBe('2')
    expect(valueOf(args, '-display')).toBe('none')
    expect(valueOf(args, '-name')).toBe('vm-1')
    expect(args).toContain('-nodefaults')
    expect(args).toContain('-no-user-config')
    expect(args).toContain('-no-reboot')
  })

  it('forwards a port on 127.0.0.1 only, to the guest port, with restricted user networking', () => {
    const { vm } = fakeConfig({ vm: { guestPort: 8081 } })
    const args = buildQemuArgs({ vm, accel: 'tcg', hostPort: 41234, sandbox: false, name: 'vm-1' })
    expect(valueOf(args, '-netdev')).toBe('user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:41234-:8081')
    expect(valueOf(args, '-device')).toBe('virtio-net-device,netdev=net0')
  })

  it('uses -cpu max under TCG and -cpu host with KVM', () => {
    const { vm } = fakeConfig()
    const tcg = buildQemuArgs({ vm, accel: 'tcg', hostPort: 1, sandbox: false, name: 'x' })
    const kvm = buildQemuArgs({ vm, accel: 'kvm', hostPort: 1, sandbox: false, name: 'x' })
    expect([valueOf(tcg, '-accel'), valueOf(tcg, '-cpu')]).toEqual(['tcg', 'max'])
    expect([valueOf(kvm, '-accel'), valueOf(kvm, '-cpu')]).toEqual(['kvm', 'host'])
  })

  it('turns off high memory for HVF', () => {
    const { vm } = fakeConfig()
    const args = buildQemuArgs({ vm, accel: 'hvf', hostPort: 1, sandbox: false, name: 'x' })
    expect(valueOf(args, '-machine')).toBe('virt,highmem=off')
    expect(valueOf(args, '-cpu')).toBe('host')
  })

  it('adds the seccomp sandbox only where QEMU supports it', () => {
    const { vm } = fakeConfig()
    const withSandbox = buildQemuArgs({ vm, accel: 'tcg', hostPort: 1, sandbox: true, name: 'x' })
    const without = buildQemuArgs({ vm, accel: 'tcg', hostPort: 1, sandbox: false, name: 'x' })
    expect(valueOf(withSandbox, '-sandbox')).toBe(sandboxArgs[1])
    expect(without).not.toContain('-sandbox')
  })
})

describe('buildQemuArgs for snapshots and clones', () => {
  it('puts the template\'s RAM in a shared file and opens QMP', () => {
    const { vm } = fakeConfig({ vm: { memoryMiB: 128 } })
    const args = buildQemuArgs({
      vm, accel: 'tcg', hostPort: 1, sandbox: false, name: 'x',
      memoryFile: { path: '/snap/ram', share: true }, qmpSocket: '/snap/qmp.sock',
    })
    expect(valueOf(args, '-machine')).toBe('virt,memory-backend=mem0')
    expect(valueOf(args, '-object')).toBe('rng-random,id=rng0,filename=/dev/urandom')
    expect(args).toContain('memory-backend-file,id=mem0,size=128M,mem-path=/snap/ram,share=on')
    expect(valueOf(args, '-qmp')).toBe('unix:/snap/qmp.sock,server=on,wait=off')
    expect(args).not.toContain('-incoming')
  })

  it('maps a clone\'s RAM privately, so the template file is never written, and waits for the state', () => {
    const { vm } = fakeConfig()
    const args = buildQemuArgs({
      vm, accel: 'tcg', hostPort: 1, sandbox: false, name: 'x',
      memoryFile: { path: '/snap/ram', share: false }, qmpSocket: '/run/c.sock', incoming: true,
    })
    expect(args).toContain('memory-backend-file,id=mem0,size=128M,mem-path=/snap/ram,share=off')
    expect(valueOf(args, '-incoming')).toBe('defer')
  })

  it('opens a QMP monitor for QEMU\'s events on an inherited socket when given one', () => {
    const { vm } = fakeConfig()
    const args = buildQemuArgs({ vm, accel: 'tcg', hostPort: 1, sandbox: false, name: 'x', eventsFd: 5 })
    expect(args.join(' ')).toContain('-chardev socket,id=events,fd=5 -mon chardev=events,mode=control')
    expect(buildQemuArgs({ vm, accel: 'tcg', hostPort: 1, sandbox: false, name: 'x' })).not.toContain('-mon')
  })

  it('serves a kernel-only guest: a named -cpu, no -initrd, no -append, and extra arguments last', () => {
    const { vm } = fakeConfig({ vm: { initrd: '', append: '', cpu: 'cortex-a72', machine: 'virt,gic-version=2', extraArgs: ['-global', 'virtio-mmio.force-legacy=false'] } })
    const args = buildQemuArgs({ vm, accel: 'tcg', hostPort: 40000, sandbox: true, name: 'vm-1' })
    expect(valueOf(args, '-cpu')).toBe('cortex-a72')
    expect(valueOf(args, '-machine')).toBe('virt,gic-version=2')
    expect(args).not.toContain('-initrd')
    expect(args).not.toContain('-append')
    expect(args.slice(-2)).toEqual(['-global', 'virtio-mmio.force-legacy=false'])
  })

  it('gives the guest vm.disk as a read-only virtio-blk drive, by the path it is given (commas escaped)', () => {
    const { vm } = fakeConfig()
    const args = buildQemuArgs({ vm, accel: 'tcg', hostPort: 40000, sandbox: true, name: 'vm-1', diskPath: '/proc/self/fd/5' })
    expect(valueOf(args, '-drive')).toBe('file=/proc/self/fd/5,if=none,format=raw,readonly=on,id=disk0')
    expect(valueOf(args, '-device', 3)).toBe('virtio-blk-device,drive=disk0')
    expect(valueOf(buildQemuArgs({ vm, accel: 'tcg', hostPort: 1, sandbox: true, name: 'x', diskPath: '/a,b' }), '-drive')).toMatch(/^file=\/a,,b,if=none/)
    expect(buildQemuArgs({ vm, accel: 'tcg', hostPort: 1, sandbox: true, name: 'x' })).not.toContain('-drive')
  })

  it('adds a mode\'s words to the kernel command line after vm.append, and makes one when vm.append is empty', () => {
    const { vm } = fakeConfig({ vm: { append: 'console=ttyS0' } })
    expect(valueOf(buildQemuArgs({ vm, accel: 'tcg', hostPort: 1, sandbox: true, name: 'x', kernelArgs: ['vmcgi_start=seed'] }), '-append')).toBe('console=ttyS0 vmcgi_start=seed')
    const bare = fakeConfig({ vm: { append: '' } }).vm
    expect(valueOf(buildQemuArgs({ vm: bare, accel: 'tcg', hostPort: 1, sandbox: true, name: 'x', kernelArgs: ['vmcgi_start=seed'] }), '-append')).toBe('vmcgi_start=seed')
  })

  it('keeps machine properties under HVF, adding highmem=off unless it is given', () => {
    const { vm } = fakeConfig({ vm: { machine: 'virt,gic-version=2' } })
    expect(valueOf(buildQemuArgs({ vm, accel: 'hvf', hostPort: 40000, sandbox: false, name: 'vm-1' }), '-machine')).toBe('virt,gic-version=2,highmem=off')
    const given = fakeConfig({ vm: { machine: 'virt,highmem=on' } }).vm
    expect(valueOf(buildQemuArgs({ vm: given, accel: 'hvf', hostPort: 40000, sandbox: false, name: 'vm-1' }), '-machine')).toBe('virt,highmem=on')
  })
})
