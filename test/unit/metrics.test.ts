import pino from 'pino'
import { request } from 'undici'
import { describe, expect, it, onTestFinished } from 'vitest'
import { buildAdminServer } from '../../src/admin.js'
import { Metrics } from '../../src/metrics.js'
import { buildServer } from '../../src/server.js'
import { fakeVmFactory } from '../helpers/fake-vm.js'
import { fakeConfig } from '../helpers/fixtures.js'

const log = pino({ level: 'silent' })

describe('metrics', () => {
  it('counts requests by vmcgi-status, observes boots, and reports VMs by state', async () => {
    const metrics = new Metrics()
    const { createVm } = fakeVmFactory('ok', (_req, res) => res.end('ok'))
    const app = await buildServer(fakeConfig({ pool: { size: 1 } }), { createVm, logger: log, metrics })
    onTestFinished(() => app.close())
    const address = await app.listen({ host: '127.0.0.1', port: 0 })
    await expect.poll(() => app.pool.ready).toBe(1)
    await (await request(`${address}/`)).body.text()
    await (await request(`${address}/`, { method: 'POST', body: 'x'.repeat(11 * 1024 * 1024) })).body.text()

    const text = await metrics.registry.metrics()
    expect(text).toContain('vmcgi_requests_total{vmcgi_status="OK",code="200"} 1')
    expect(text).toContain('vmcgi_requests_total{vmcgi_status="body-too-large",code="413"} 1')
    expect(text).toMatch(/vmcgi_vm_boot_seconds_count\{accelerated="false"\} [1-9]/)
    expect(text).toMatch(/vmcgi_vms\{state="pooled"\} [01]/)
    expect(text).toContain('vmcgi_queue_length 0')
  })

  it('serves /metrics on the admin listener only', async () => {
    const metrics = new Metrics()
    const admin = buildAdminServer(metrics, log)
    onTestFinished(() => admin.close())
    const res = await admin.inject({ method: 'GET', url: '/metrics' })
    expect(res.statusCode).toBe(200)
    expect(res.headers['content-type']).toMatch(/^text\/plain/)
    expect(res.body).toContain('vmcgi_process_')
    expect((await admin.inject({ method: 'GET', url: '/' })).statusCode).toBe(404)
  })
})
