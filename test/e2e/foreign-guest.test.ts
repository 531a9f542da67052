// A guest vmcgi did not build, served by configuration alone: the test guest
// booted as images/test-site/one-socket/init, which prints no ready line and
// whose HTTP server, like a small OS's TCP stack, has one listening socket and
// no backlog, and resets whoever comes while it is busy.

import { request } from 'undici'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { allQemuProcesses, expectNoVms, startVmcgi, testImage, type Vmcgi } from './harness.js'

describe('a silent guest with a one-socket TCP stack', () => {
  let vmcgi: Vmcgi
  beforeAll(async () => {
    // Configured as Starina is (a machine with properties, a named CPU, modern
    // virtio-mmio through vm.extraArgs); readiness, probes and timeouts are the defaults.
    vmcgi = await startVmcgi({
      vm: {
        append: 'console=ttyAMA0 quiet rdinit=/www/one-socket/init',
        machine: 'virt,gic-version=2',
        cpu: 'cortex-a72',
        extraArgs: ['-global', 'virtio-mmio.force-legacy=false'],
      },
    }, testImage())
  })
  afterAll(async () => {
    await vmcgi?.stop()
    expect(await allQemuProcesses()).toEqual([])
  })

  it('boots QEMU as configured', async () => {
    const spawned = vmcgi.logLines().find((line) => line.msg === 'QEMU spawned') as { argv?: string[] } | undefined
    const argv = spawned?.argv ?? []
    expect(argv[argv.indexOf('-machine') + 1]).toBe('virt,gic-version=2')
    expect(argv[argv.indexOf('-cpu') + 1]).toBe('cortex-a72')
    expect(argv.slice(-2)).toEqual(['-global', 'virtio-mmio.force-legacy=false'])
  })

  it('answers every request from its own VM, with the guest\'s own headers', async () => {
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
  })
})
