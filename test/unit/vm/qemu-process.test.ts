// QemuProcess against tiny stand-in programs: how a spawn ends, even one that fails for want of descriptors.

import { closeSync, fstatSync, openSync } from 'node:fs'
import { pino } from 'pino'
import { describe, expect, it } from 'vitest'
import { QemuProcess } from '../../../src/vm/qemu-process.js'

const log = pino({ level: 'silent' })

/**
 * Opens /dev/null until the process has no descriptor left, and returns what
 * closes them all again. Everything between the two is synchronous, so that
 * nothing else in this process finds itself without a descriptor.
 */
function exhaustDescriptors(): () => void {
  const held: number[] = []
  const release = () => held.splice(0).forEach((fd) => closeSync(fd))
  try {
    for (;;) held.push(openSync('/dev/null', 'r'))
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EMFILE') {
      release()
      throw error
    }
  }
  return release
}

function isOpen(fd: number): boolean {
  try {
    fstatSync(fd)
    return true
  } catch {
    return false
  }
}

describe('QemuProcess', () => {
  it('tells an exit by its status, with the last line QEMU wrote to stderr', async () => {
    const qemu = new QemuProcess({ argv: [process.execPath, '-e', 'console.error("no such machine"); process.exit(3)'], killGraceMs: 100, log })
    const reason = await qemu.exited
    expect(reason).toMatchObject({ code: 'VM_EXITED', message: 'QEMU exited (status 3): no such machine' })
    expect(qemu.exitSignal.reason).toBe(reason)
    expect(await qemu.isRunning()).toBe(false)
  })

  it('says the guest powered off when QEMU announced that on its events monitor', async () => {
    const announce = `new (require('net').Socket)({ fd: 3 }).write('{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}\\n', () => process.exit(0))`
    const qemu = new QemuProcess({ argv: [process.execPath, '-e', announce], killGraceMs: 100, events: true, log })
    const reason = await qemu.exited
    expect(reason).toMatchObject({ code: 'VM_EXITED', message: 'QEMU exited (status 0): the guest powered off' })
  })

  it('escalates SIGTERM to SIGKILL after the grace', async () => {
    const qemu = new QemuProcess({
      argv: [process.execPath, '-e', 'process.on("SIGTERM", () => {}); console.log("up"); setInterval(() => {}, 1000)'],
      killGraceMs: 200,
      log,
    })
    await new Promise((resolve) => qemu.stdout.once('data', resolve))
    const started = performance.now()
    qemu.kill('SIGTERM')
    expect(await qemu.exited).toMatchObject({ code: 'VM_EXITED', message: 'QEMU exited (SIGKILL)' })
    expect(performance.now() - started).toBeGreaterThanOrEqual(190)
  })

  it('ends with SPAWN_FAILED when the program does not exist, and closes the descriptors it was to inherit', async () => {
    const fd = openSync('/dev/null', 'r')
    const qemu = new QemuProcess({ argv: ['/nonexistent/qemu-system-aarch64'], killGraceMs: 100, inherit: [fd], log })
    expect(isOpen(fd)).toBe(false)
    expect(await qemu.exited).toMatchObject({ code: 'SPAWN_FAILED', statusCode: 502 })
    expect(qemu.pid).toBeUndefined()
  })

  it('ends with SPAWN_FAILED, neither throwing nor leaving an unhandled error, when no descriptor is left to spawn with', async () => {
    const fd = openSync('/dev/null', 'r')
    const release = exhaustDescriptors()
    let qemu: QemuProcess
    try {
      qemu = new QemuProcess({ argv: [process.execPath, '-e', ''], killGraceMs: 100, inherit: [fd], log })
    } finally {
      release()
    }
    expect(isOpen(fd)).toBe(false)
    const reason = await qemu.exited
    expect(reason).toMatchObject({ code: 'SPAWN_FAILED', statusCode: 502, status: 'spawn-failed' })
    expect(reason.message).toContain('EMFILE')
    expect(qemu.pid).toBeUndefined()
    expect(qemu.exitSignal.aborted).toBe(true)
    expect(await qemu.isRunning()).toBe(false)
    // What a VM does with a QEMU that never ran: harmless.
    qemu.stdout.on('data', () => {})
    qemu.stdin.write('vmcgi-seed\n')
    qemu.kill('SIGTERM')
    qemu.kill('SIGKILL')
    expect(qemu.stderrTail()).toBe('')
  })
})
