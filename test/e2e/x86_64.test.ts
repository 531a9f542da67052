// The x86_64 guest end to end: the real CLI with qemu-system-x86_64 and the
// microvm machine, as config/x86_64.example.json sets them up, booting the
// guest built by `bash images/build.sh --arch x86_64`.

import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { request } from 'undici'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { allQemuProcesses, expectGuestPage, expectNoVms, imageDir, repo, startVmcgi, type Vmcgi } from './harness.js'

const example = JSON.parse(readFileSync(join(repo, 'config/x86_64.example.json'), 'utf8')) as {
  vm: { qemu: string; machine: string; append: string }
}
// Only what makes it x86_64; the harness points kernel and initrd at the image.
const { qemu, machine, append } = example.vm

function x86Image(): string {
  const dir = join(repo, 'images/out/x86_64')
  if (!existsSync(join(dir, 'Image'))) {
    throw new Error(`no x86_64 guest in ${dir}: run \`bash images/build.sh --arch x86_64\` first`)
  }
  return imageDir('x86_64')
}

describe('the x86_64 guest on QEMU microvm', () => {
  let vmcgi: Vmcgi
  beforeAll(async () => {
    vmcgi = await startVmcgi({ vm: { qemu, machine, append } }, x86Image())
  })
  afterAll(async () => {
    await vmcgi?.stop()
  })

  it('starts on qemu-system-x86_64 after a preflight boot', () => {
    const lines = vmcgi.logLines()
    const accel = lines.find((line) => typeof line.msg === 'string' && line.msg.startsWith('accelerator:'))
    expect(String(accel?.qemu)).toMatch(/qemu-system-x86_64$/)
    expect(lines.some((line) => line.msg === 'preflight boot answered')).toBe(true)
  })

  it('serves the guest page from a fresh VM, then kills it', async () => {
    await expectGuestPage(vmcgi)
  })

  it('runs a CGI script, with a different VM and id each time', async () => {
    const answers = []
    for (let i = 0; i < 2; i++) {
      const res = await request(`${vmcgi.url}/cgi-bin/id`)
      expect(res.statusCode).toBe(200)
      expect(res.headers['vmcgi-status']).toBe('OK')
      answers.push({ vm: res.headers['vmcgi-vm-id'], text: await res.body.text() })
    }
    const ids = answers.map(({ text }) => /^id: ([0-9a-f]{32})$/m.exec(text)?.[1])
    expect(ids.every(Boolean)).toBe(true)
    expect(ids[0]).not.toBe(ids[1])
    expect(answers[0]!.vm).not.toBe(answers[1]!.vm)
    // A fresh machine: up for about as long as it took to boot.
    for (const { text } of answers) expect(Number(/^uptime: ([\d.]+)$/m.exec(text)?.[1])).toBeLessThan(10)
    await expectNoVms(vmcgi)
  })

  it('gives the guest the host clock through the microvm RTC', async () => {
    const res = await request(`${vmcgi.url}/`)
    await res.body.text()
    const guestDate = Date.parse(String(res.headers.date))
    expect(Math.abs(guestDate - Date.now())).toBeLessThan(60_000)
    await expectNoVms(vmcgi)
  })

  it('exits on SIGTERM and leaves no QEMU behind', async () => {
    await vmcgi.stop()
    expect(vmcgi.child.exitCode).toBe(0)
    expect(await allQemuProcesses()).toEqual([])
  })
})
