// A guest vmcgi did not build, served by configuration alone: the test guest
// booted as images/test-site/one-socket/init, which prints no ready line and
// whose HTTP server, like a small OS's TCP stack, has one listening socket and
// no backlog, and resets whoever comes while it is busy. Booted from the kernel
// and the test guest's initramfs, then, like a kernel-only OS, from one kernel
// file with that initramfs built in and no initrd.

import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { request } from 'undici'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { qemuProcesses } from '../support/proc.js'
import { allQemuProcesses, expectNoVms, repo, startVmcgi, testImage, type Vmcgi } from './harness.js'

// Configured as Starina is (a machine with properties, a named CPU, modern
// virtio-mmio through vm.extraArgs); readiness, probes and timeouts are the defaults.
const starinaLike = {
  append: 'console=ttyAMA0 quiet rdinit=/www/one-socket/init',
  machine: 'virt,gic-version=2',
  cpu: 'cortex-a72',
  extraArgs: ['-global', 'virtio-mmio.force-legacy=false'],
}

/** The test guest's initramfs built into the kernel: one file, which scripts/setup.sh builds. */
function kernelOnlyImage(): string {
  const dir = join(repo, 'images/out/kernel-only')
  if (!existsSync(join(dir, 'Image'))) {
    throw new Error(`no kernel in ${dir}: run \`npm run setup\`, or \`npm run images -- --builtin-initramfs images/out/test-site/initramfs.cpio.gz --out images/out/kernel-only\``)
  }
  return dir
}

/** The argv of every QEMU this vmcgi spawned so far. */
function spawnedArgv(vmcgi: Vmcgi): string[][] {
  return vmcgi.logLines().filter((line) => line.msg === 'QEMU spawned').map((line) => (line as { argv?: string[] }).argv ?? [])
}

/** Six sequential requests, each answered 200 by the guest itself from a VM of its own. */
async function expectSixFromTheirOwnVms(vmcgi: Vmcgi): Promise<void> {
  const ids = new Set<string>()
  for (let i = 1; i <= 6; i++) {
    const res = await request(`${vmcgi.url}/n${i}`)
    const body = await res.body.text()
    expect(res.statusCode, body).toBe(200)
    expect(res.headers['vmcgi-status']).toBe('OK')
    expect(res.headers['x-powered-by']).toBe('one-socket')
    expect(body).toBe(`served one at a time: GET /n${i} HTTP/1.1\r\n`)
    ids.add(String(res.headers['vmcgi-vm-id']))
  }
  expect(ids.size).toBe(6)
  await expectNoVms(vmcgi)
}

describe('a silent guest with a one-socket TCP stack', () => {
  let vmcgi: Vmcgi
  beforeAll(async () => {
    vmcgi = await startVmcgi({ vm: starinaLike }, testImage())
  })
  afterAll(async () => {
    await vmcgi?.stop()
    expect(await allQemuProcesses()).toEqual([])
  })

  it('boots QEMU as configured', async () => {
    const argv = spawnedArgv(vmcgi)[0] ?? []
    expect(argv[argv.indexOf('-machine') + 1]).toBe('virt,gic-version=2')
    expect(argv[argv.indexOf('-cpu') + 1]).toBe('cortex-a72')
    expect(argv.slice(-2)).toEqual(['-global', 'virtio-mmio.force-legacy=false'])
  })

  it('answers every request from its own VM, with the guest\'s own headers', async () => {
    await expectSixFromTheirOwnVms(vmcgi)
  })
})

describe('the same guest as one kernel file, with no initrd', () => {
  let vmcgi: Vmcgi
  let kernel: string
  beforeAll(async () => {
    const image = kernelOnlyImage()
    kernel = join(image, 'Image')
    // initrd: undefined leaves the key out of the config file (JSON.stringify drops it).
    vmcgi = await startVmcgi({ vm: { ...starinaLike, initrd: undefined } }, image)
  })
  afterAll(async () => {
    if (!vmcgi) return
    await vmcgi.stop()
    // None of its QEMU processes is left, wherever it went (others' may run on this machine).
    const names = new Set(spawnedArgv(vmcgi).map((argv) => argv[argv.indexOf('-name') + 1]))
    expect((await qemuProcesses()).filter((qemu) => names.has(qemu.name)).map((qemu) => `${qemu.pid} ${qemu.command}`)).toEqual([])
  })

  it('answers every request from its own VM, booted from the kernel alone', async () => {
    await expectSixFromTheirOwnVms(vmcgi)
    // The init ran from the archive built into the kernel: QEMU was given none.
    const spawned = spawnedArgv(vmcgi)
    expect(spawned.length).toBeGreaterThanOrEqual(6)
    for (const argv of spawned) {
      expect(argv[argv.indexOf('-kernel') + 1]).toBe(kernel)
      expect(argv).not.toContain('-initrd')
      expect(argv[argv.indexOf('-append') + 1]).toBe(starinaLike.append)
    }
  })
})
