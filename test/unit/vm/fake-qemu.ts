// Sets up VMs whose QEMU is test/fixtures/fake-qemu.js, for the unit tests of src/vm; each is checked gone when its test ends.

import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import type { FastifyBaseLogger } from 'fastify'
import { pino } from 'pino'
import { expect, onTestFinished } from 'vitest'
import type { GuestVm } from '../../../src/vm/guest.js'
import { createQemuVmFactory, type VmEnvironment } from '../../../src/vm/vm.js'
import { fakeConfig } from '../../helpers/fixtures.js'

const fakeQemu = fileURLToPath(new URL('../../fixtures/fake-qemu.js', import.meta.url))

export interface Setup {
  env: VmEnvironment
  /** A folder for the test's files, removed when it ends. */
  dir: string
  log: FastifyBaseLogger
  /** Log lines, parsed. */
  lines: Array<Record<string, unknown>>
  /** The pids of the fake QEMUs started so far, in order; a fake QEMU appends its own. */
  pids: () => number[]
  /** A VM made by the real factory; destroyed when the test ends, and every QEMU it started checked gone. */
  createVm: () => GuestVm
}

/**
 * A VM environment whose QEMU is the fake, told what to do by `behaviour` (words of -append,
 * see the fixture), with short timeouts unless `overrides` says otherwise. With `clone`, VMs
 * are clones of a stand-in template.
 */
export function setUp(behaviour: string, overrides: Record<string, Record<string, unknown>> = {}, { clone = false } = {}): Setup {
  const dir = mkdtempSync(join(tmpdir(), 'vmcgi-vm-test-'))
  onTestFinished(() => rmSync(dir, { recursive: true, force: true }))
  const attempts = join(dir, 'attempts')
  const config = fakeConfig({
    ...overrides,
    vm: { qemu: fakeQemu, append: `attempts=${attempts} ${behaviour}`, killGraceMs: 200, ...overrides.vm },
    readiness: { timeoutMs: 3_000, intervalMs: 10, attemptTimeoutMs: 100, ...overrides.readiness },
  })
  const snapshot = clone ? { ramPath: join(dir, 'ram'), statePath: join(dir, 'state'), readOnlyRam: false } : undefined
  if (snapshot) writeFileSync(snapshot.statePath, 'template device state\n')
  if (snapshot) writeFileSync(snapshot.ramPath, '')
  const env: VmEnvironment = { config, accel: { accel: 'tcg', reason: 'a test' }, sandbox: false, deathSignalPrefix: [], snapshot }
  const lines: Array<Record<string, unknown>> = []
  const log: FastifyBaseLogger = pino({ level: 'debug' }, { write: (line: string) => void lines.push(JSON.parse(line) as Record<string, unknown>) })
  const pids = () => {
    try {
      return readFileSync(attempts, 'utf8').trim().split('\n').filter(Boolean).map(Number)
    } catch {
      return []
    }
  }
  const createVm = () => {
    const vm = createQemuVmFactory(env)(log)
    onTestFinished(async () => {
      await vm.destroy(new Error('the test ended'))
      expect(pids().filter(alive)).toEqual([])
    })
    return vm
  }
  return { env, dir, log, lines, pids, createVm }
}

export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}
