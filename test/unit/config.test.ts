import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { defaultMaxVms, normalizeConfig } from '../../src/config.js'
import { ConfigError } from '../../src/errors.js'
import { fakeImageDir } from '../helpers/fixtures.js'
import { fieldOf as refusedField } from '../helpers/field-of.js'

const fieldOf = (run: () => unknown) => refusedField(ConfigError, run)

describe('normalizeConfig', () => {
  it('applies defaults, resolves paths relative to the config and freezes', () => {
    const images = fakeImageDir()
    const config = normalizeConfig(
      { vm: { kernel: 'Image', initrd: 'initramfs.cpio.gz', qemu: './qemu-system-aarch64' } },
      { baseDir: images.dir },
    )
    expect(config.vm.kernel).toBe(images.kernel)
    expect(config.vm.initrd).toBe(images.initrd)
    expect(config.vm.qemu).toBe(images.qemu)
    expect(config.listen).toEqual({ host: '127.0.0.1', port: 8080 })
    expect(config.health.path).toBe('/up')
    expect(config.vm.accel).toBe('auto')
    expect(config.vm.memoryMiB).toBe(128)
    expect(config.readiness.path).toBe('/')
    expect(Object.isFrozen(config.vm)).toBe(true)
  })

  it('refuses a kernel file that no -kernel boot could start, naming vm.kernel', () => {
    const images = fakeImageDir()
    writeFileSync(images.kernel, 'this is a text file, not a kernel\n')
    expect(fieldOf(() => normalizeConfig({ vm: { kernel: images.kernel, initrd: images.initrd, qemu: images.qemu } }, { baseDir: '/' })))
      .toBe('vm.kernel')
    const arm64 = Buffer.alloc(64)
    arm64.write('ARM\x64', 0x38, 'latin1')
    writeFileSync(images.kernel, arm64)
    expect(normalizeConfig({ vm: { kernel: images.kernel, initrd: images.initrd, qemu: images.qemu } }, { baseDir: '/' }).vm.kernel)
      .toBe(images.kernel)
  })

  it('takes a kernel-only guest: no initrd, an empty command line, a -cpu, and extra arguments, refusing those vmcgi sets', () => {
    const images = fakeImageDir()
    const load = (vm: Record<string, unknown>) => () => normalizeConfig({ vm: { kernel: images.kernel, qemu: images.qemu, ...vm } }, { baseDir: '/' })
    const config = load({ append: '', cpu: 'neoverse-n1', extraArgs: ['-global', 'virtio-mmio.force-legacy=false'] })()
    expect(config.vm.initrd).toBe('')
    expect(config.vm.extraArgs).toEqual(['-global', 'virtio-mmio.force-legacy=false'])
    expect(fieldOf(load({ extraArgs: ['-global', 'x=y', '-netdev', 'user,id=n1'] }))).toBe('vm.extraArgs.2')
    expect(fieldOf(load({ extraArgs: [42] }))).toBe('vm.extraArgs.0')
    expect(fieldOf(load({ cpu: 'max; rm -rf /' }))).toBe('vm.cpu')
  })

  it('resolves vm.disk against the config\'s folder, and names it when it cannot be read', () => {
    const images = fakeImageDir()
    const load = (disk: string) => () => normalizeConfig({ vm: { kernel: images.kernel, qemu: images.qemu, disk } }, { baseDir: images.dir })
    expect(load('initramfs.cpio.gz')().vm.disk).toBe(images.initrd)
    expect(load('')().vm.disk).toBe('')
    expect(fieldOf(load('missing.erofs'))).toBe('vm.disk')
    expect(fieldOf(load('.'))).toBe('vm.disk')
  })

  it('bounds VM counts and sizes by what the host can hold', () => {
    const images = fakeImageDir()
    const host = { cpus: 2, memoryMiB: 4096 }
    const load = (raw: Record<string, Record<string, unknown>>) => () => normalizeConfig(
      { ...raw, vm: { kernel: images.kernel, initrd: images.initrd, qemu: images.qemu, ...raw.vm } },
      { baseDir: '/', host },
    )
    expect(fieldOf(load({ limits: { maxVms: 1e9 } }))).toBe('limits.maxVms')
    expect(fieldOf(load({ pool: { size: 1024 } }))).toBe('pool.size')
    expect(fieldOf(load({ vm: { memoryMiB: 65536 } }))).toBe('vm.memoryMiB')
    expect(fieldOf(load({ limits: { bodyLimitBytes: 1e300 } }))).toBe('limits.bodyLimitBytes')
    expect(load({ limits: { maxVms: 16 }, pool: { size: 16 } })().limits.maxVms).toBe(16)
  })

  it('finds a bare qemu name on PATH', () => {
    const images = fakeImageDir()
    const config = normalizeConfig(
      { vm: { kernel: images.kernel, initrd: images.initrd } },
      { baseDir: '/', env: { PATH: `/nonexistent:${images.dir}` } },
    )
    expect(config.vm.qemu).toBe(join(images.dir, 'qemu-system-aarch64'))
  })

  it('lets --host and --port override the file', () => {
    const images = fakeImageDir()
    const config = normalizeConfig(
      { listen: { port: 1 }, vm: { kernel: 'Image', initrd: 'initramfs.cpio.gz', qemu: images.qemu } },
      { baseDir: images.dir, overrides: { host: '0.0.0.0', port: 9000 } },
    )
    expect(config.listen).toEqual({ host: '0.0.0.0', port: 9000 })
  })

  it.each<[string, Record<string, unknown>, string]>([
    ['an unknown key', { vm: {}, colour: 'blue' }, 'colour'],
    ['an unknown nested key', { vm: { memoryMb: 128 } }, 'vm.memoryMb'],
    ['a wrong type', { vm: { memoryMiB: '128' } }, 'vm.memoryMiB'],
    ['a value out of range', { listen: { port: 70000 }, vm: {} }, 'listen.port'],
    ['an unknown accelerator', { vm: { accel: 'xen' } }, 'vm.accel'],
    ['a readiness path without a slash', { vm: {}, readiness: { path: 'up' } }, 'readiness.path'],
    ['a missing vm section', {}, 'vm'],
    ['a timeout longer than a timer can wait', { vm: {}, timeouts: { requestMs: 3_000_000_000 } }, 'timeouts.requestMs'],
  ])('names the field for %s', (_what, raw, field) => {
    const images = fakeImageDir()
    const withFiles = { ...raw }
    if (raw.vm) withFiles.vm = { kernel: images.kernel, initrd: images.initrd, qemu: images.qemu, ...(raw.vm as object) }
    expect(fieldOf(() => normalizeConfig(withFiles, { baseDir: images.dir }))).toBe(field)
  })

  it('names the missing kernel, initrd and qemu files', () => {
    const images = fakeImageDir()
    const base = { kernel: images.kernel, initrd: images.initrd, qemu: images.qemu }
    const check = (vm: object) => fieldOf(() => normalizeConfig({ vm: { ...base, ...vm } }, { baseDir: images.dir, env: { PATH: '' } }))
    expect(check({ kernel: 'missing-Image' })).toBe('vm.kernel')
    expect(check({ initrd: 'missing.cpio.gz' })).toBe('vm.initrd')
    expect(check({ qemu: 'qemu-system-nothing' })).toBe('vm.qemu')
    expect(check({ qemu: './Image' })).toBe('vm.qemu')
  })
})

describe('configuration from the environment', () => {
  const file = (images: ReturnType<typeof fakeImageDir>) => ({
    listen: { host: '127.0.0.1', port: 8000 },
    log: { level: 'warn' },
    vm: { kernel: images.kernel, initrd: images.initrd, qemu: images.qemu },
  })

  it('takes the flag over the environment, the environment over the file, the file over the default', () => {
    const images = fakeImageDir()
    const env = { VMCGI_PORT: '9001', VMCGI_HOST: '0.0.0.0', VMCGI_MAX_VMS: '3', LOG_LEVEL: 'debug', VMCGI_POOL_SIZE: '2' }
    const config = normalizeConfig(file(images), { baseDir: images.dir, env, overrides: { port: 9002 } })
    expect(config.listen).toEqual({ host: '0.0.0.0', port: 9002 })
    expect(config.limits.maxVms).toBe(3)
    expect(config.pool.size).toBe(2)
    expect(config.log.level).toBe('debug')
    const fileOnly = normalizeConfig(file(images), { baseDir: images.dir, env: {} })
    expect(fileOnly.listen.port).toBe(8000)
    expect(fileOnly.log.level).toBe('warn')
    expect(fileOnly.pool.size).toBe(0)
  })

  it('ignores empty variables', () => {
    const images = fakeImageDir()
    const config = normalizeConfig(file(images), { baseDir: images.dir, env: { VMCGI_PORT: '' } })
    expect(config.listen.port).toBe(8000)
  })

  it('names the variable when its value is wrong', () => {
    const images = fakeImageDir()
    expect(fieldOf(() => normalizeConfig(file(images), { baseDir: images.dir, env: { VMCGI_PORT: 'eighty' } }))).toBe('VMCGI_PORT')
    expect(fieldOf(() => normalizeConfig(file(images), { baseDir: images.dir, env: { VMCGI_ACCEL: 'xen' } }))).toBe('VMCGI_ACCEL (vm.accel)')
    expect(fieldOf(() => normalizeConfig(file(images), { baseDir: images.dir, env: { VMCGI_PORT: '70000' } }))).toBe('VMCGI_PORT (listen.port)')
  })
})

describe('defaultMaxVms', () => {
  it('allows two VMs per core, within half of the memory', () => {
    expect(defaultMaxVms(128, { cpus: 2, memoryMiB: 24 * 1024 })).toBe(4)
    expect(defaultMaxVms(128, { cpus: 4, memoryMiB: 1024 })).toBe(2)
    expect(defaultMaxVms(4096, { cpus: 4, memoryMiB: 2048 })).toBe(1)
  })
})
