// buildServer: the routes, the per-request VM, and the one place where every
// failure becomes an HTTP status and a vmcgi-status reason. No listen() here,
// so that tests can inject() or listen on port 0.

import replyFrom from '@fastify/reply-from'
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify'
import { Agent } from 'undici'
import type { Config } from './config.js'
import { toVmcgiError, type VmcgiError } from './errors.js'
import { forwardToVm } from './proxy.js'
import type { GuestVm, VmFactory } from './vm/vm.js'

export interface ServerDeps {
  createVm: VmFactory
  /** A pino logger; by default one is made at config.log.level. */
  logger?: FastifyBaseLogger
}

interface RequestState {
  vm: GuestVm | undefined
  failure: VmcgiError | undefined
}

declare module 'fastify' {
  interface FastifyRequest {
    vmcgi: RequestState
  }
}

export async function buildServer(config: Config, deps: ServerDeps): Promise<FastifyInstance> {
  const app = Fastify({
    ...(deps.logger ? { loggerInstance: deps.logger } : { logger: { level: config.log.level } }),
    // One log line per request, written by the onResponse hook below.
    logController: new LogController({ disableRequestLogging: true }),
    requestIdHeader: 'x-request-id',
    // Allow a guest the whole of its boot and answer; the per-phase timeouts end a request sooner.
    requestTimeout: 0,
  }) as unknown as FastifyInstance

  // One Agent for all VMs: each VM is a new origin, and undici (≥ 7.15) drops
  // the origin's pool once its sockets close, which they do when the VM dies.
  const agent = new Agent({
    headersTimeout: config.timeouts.headersMs,
    bodyTimeout: config.timeouts.bodyIdleMs,
    keepAliveTimeout: 1_000,
    connect: { timeout: config.timeouts.headersMs },
  })
  await app.register(replyFrom, { undici: agent, disableCache: true, disableRequestLogging: true })

  const live = new Set<GuestVm>()
  app.addHook('onClose', async () => {
    await Promise.all([...live].map((vm) => vm.destroy()))
    await agent.close()
  })

  // Bodies go to the guest as they arrive: nothing is parsed or buffered here.
  app.removeAllContentTypeParsers()
  app.addContentTypeParser('*', (_request, payload, done) => done(null, payload))

  app.decorateRequest('vmcgi', null as unknown as RequestState)
  app.addHook('onRequest', async (request) => {
    request.vmcgi = { vm: undefined, failure: undefined }
  })

  app.get(config.health.path, async (_request, reply) => {
    reply.header('vmcgi-status', 'OK').type('text/plain; charset=utf-8')
    return 'OK\n'
  })

  app.all('/*', async (request, reply) => {
    const vm = deps.createVm(request.log)
    request.vmcgi.vm = vm
    live.add(vm)
    const clientGone = new AbortController()
    // Fires once the response is complete or the client has gone: either way the VM dies.
    reply.raw.once('close', () => {
      clientGone.abort()
      void vm.close().finally(() => live.delete(vm))
    })
    await vm.boot(clientGone.signal)
    return forwardToVm(request, reply, vm)
  })

  app.setErrorHandler((error, request, reply) => sendFailure(request, reply, toVmcgiError(error)))

  app.addHook('onResponse', async (request, reply) => {
    const { vm, failure } = request.vmcgi
    request.log.info({
      method: request.method,
      url: request.url,
      statusCode: reply.statusCode,
      vmcgiStatus: reply.getHeader('vmcgi-status'),
      vm: vm?.id,
      bootMs: vm?.bootMs || undefined,
      ms: Math.round(reply.elapsedTime),
      failure: failure?.code,
    }, 'request')
  })

  return app
}

/** The one place where a failure becomes an HTTP answer. */
function sendFailure(request: FastifyRequest, reply: FastifyReply, failure: VmcgiError): void {
  request.vmcgi.failure = failure
  const vm = request.vmcgi.vm
  const level = failure.statusCode >= 500 ? 'warn' : 'info'
  request.log[level]({ err: failure, vm: vm?.id, console: vm?.consoleTail() || undefined }, failure.message)
  if (reply.raw.headersSent || reply.raw.destroyed) {
    // Mid-body: nothing honest can be added, so the client sees the stream cut.
    reply.raw.destroy()
    return
  }
  const message = failure.code === 'INTERNAL' ? 'internal error' : failure.message
  reply
    .code(failure.statusCode)
    .header('vmcgi-status', failure.status)
    .type('text/plain; charset=utf-8')
    .send(`vmcgi: ${failure.status}: ${message}\n`)
}
