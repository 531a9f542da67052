// Small files that stand in for a kernel, an initrd and a QEMU binary, for
// tests that validate configuration without starting anything.

import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { onTestFinished } from 'vitest'
import { normalizeConfig, type Config } from '../../src/config.js'

export interface FakeImageDir {
  dir: string
  kernel: string
  initrd: string
  qemu: string
}

/** A temporary folder with a kernel, an initrd and an executable qemu; removed when the test ends. */
export function fakeImageDir(): FakeImageDir {
  const dir = mkdtempSync(join(tmpdir(), 'vmcgi-test-'))
  onTestFinished(() => rmSync(dir, { recursive: true, force: true }))
  const kernel = join(dir, 'Image')
  const initrd = join(dir, 'initramfs.cpio.gz')
  const qemu = join(dir, 'qemu-system-aarch64')
  // ELF's magic, enough for vm.kernel's check.
  writeFileSync(kernel, '\x7fELF fake kernel')
  writeFileSync(initrd, 'initrd')
  writeFileSync(qemu, '#!/bin/sh\nexit 0\n')
  chmodSync(qemu, 0o755)
  return { dir, kernel, initrd, qemu }
}

/** A valid, frozen config over fake image files, with `overrides` merged per section. */
export function fakeConfig(overrides: Record<string, Record<string, unknown>> = {}): Config {
  const images = fakeImageDir()
  const raw: Record<string, Record<string, unknown>> = { ...overrides }
  raw.vm = { kernel: images.kernel, initrd: images.initrd, qemu: images.qemu, ...overrides.vm }
  return normalizeConfig(raw, { baseDir: images.dir })
}
