// One log line and one count per response, written when it closes: complete,
// cut, or abandoned by its client.

import fp from 'fastify-plugin'
import type { Metrics } from '../metrics.js'

export const accessLog = fp<{ metrics: Metrics }>(async (app, { metrics }) => {
  app.addHook('onRequest', async (request, reply) => {
    const exchange = request.exchange!
    exchange.onClosed(() => {
      const { failure } = exchange
      const vm = exchange.lease?.vm
      const statusCode = !reply.raw.headersSent && failure ? failure.statusCode : reply.statusCode
      request.log.info({
        method: request.method,
        url: request.url,
        statusCode,
        vmcgiStatus: reply.getHeader('vmcgi-status'),
        complete: reply.raw.writableFinished,
        vm: vm?.id,
        bootMs: vm?.bootMs || undefined,
        ms: Math.round(reply.elapsedTime),
        failure: failure?.code,
      }, 'request')
      // A response cut after its headers said OK counts under its failure.
      metrics.countRequest(String(failure?.status ?? reply.getHeader('vmcgi-status') ?? 'none'), statusCode)
    })
  })
}, { name: 'vmcgi-access-log', dependencies: ['vmcgi-exchange'] })
