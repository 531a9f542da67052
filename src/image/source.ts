// Where an image comes from, read with skopeo (Debian's `skopeo`): an image of
// the local Docker daemon, a `docker save` archive of either kind (Docker
// 20.10's manifest.json + <id>/layer.tar, or Docker 25's OCI layout with a
// manifest.json beside it), or an OCI image layout. An image index is
// narrowed to the one platform of the guest's architecture.

import { createHash } from 'node:crypto'
import { existsSync } from 'node:fs'
import { execa } from 'execa'
import type { GuestArch } from '../vm/accel.js'
import { ImageError } from './errors.js'

export type { GuestArch }


/** The OCI architecture of each guest vmcgi has a kernel for. */
export const ociArchOf: Record<GuestArch, string> = { aarch64: 'arm64', x86_64: 'amd64' }
const guestOf = new Map(Object.entries(ociArchOf).map(([guest, oci]) => [oci, guest as GuestArch]))

export interface Source {
  /** As given: docker-daemon:NAME:TAG, docker-archive:PATH or oci:PATH[:REF]. */
  text: string
  transport: 'docker-daemon' | 'docker-archive' | 'oci'
}

export function parseSource(text: string): Source {
  const match = /^(docker-daemon|docker-archive|oci):(.+)$/.exec(text)
  if (!match) {
    throw new ImageError('from-image', `"${text}" is not an image source: use docker-daemon:NAME:TAG, docker-archive:PATH or oci:PATH`)
  }
  const transport = match[1] as Source['transport']
  if (transport !== 'docker-daemon') {
    // oci:PATH:REF; a path may not contain the colon then.
    const path = transport === 'oci' ? match[2]!.replace(/:[^/:]*$/, '') : match[2]!
    if (!existsSync(path)) throw new ImageError('from-image', `${path} does not exist`)
  }
  return { text, transport }
}

/** The image's config blob (its digest is the image's ID) for the architecture chosen, and that architecture. */
export interface ImageConfigBlob {
  arch: GuestArch
  raw: Buffer
  /** sha256 of the blob, hex: the cache key of everything made from the image. */
  id: string
  config: {
    architecture?: string
    os?: string
    config?: Record<string, unknown>
  }
}

interface RawManifest {
  mediaType?: string
  manifests?: { platform?: { os?: string; architecture?: string; variant?: string } }[]
}

/**
 * Picks the architecture: `wanted` (--arch) if given, else for an image index
 * this host's, else the image's own. Then reads the config blob of that one.
 */
export async function readImageConfig(source: Source, wanted: GuestArch | undefined, hostArch: GuestArch): Promise<ImageConfigBlob> {
  const raw = JSON.parse((await skopeo(['inspect', '--raw', source.text], source)).toString('utf8')) as RawManifest
  let arch = wanted
  if (raw.manifests) {
    const platforms = raw.manifests.map(({ platform }) => platform).filter((platform) => platform?.os === 'linux')
    const names = platforms.map((platform) => `linux/${platform!.architecture}${platform!.variant ? `/${platform!.variant}` : ''}`)
    const target = arch ?? hostArch
    if (!platforms.some((platform) => platform!.architecture === ociArchOf[target])) {
      const hint = wanted ? '' : ` (choose one with --arch ${names.map((name) => guestOf.get(name.split('/')[1]!)).filter(Boolean).join(' or --arch ') || '…, but none has a vmcgi guest'})`
      throw new ImageError('arch', `the image index has no linux/${ociArchOf[target]} image; it has ${names.join(', ') || 'no linux image'}${hint}`)
    }
    arch = target
  }
  const override = arch ? ['--override-arch', ociArchOf[arch], '--override-os', 'linux'] : []
  const blob = await skopeo(['inspect', '--config', '--raw', ...override, source.text], source)
  const config = JSON.parse(blob.toString('utf8')) as ImageConfigBlob['config']
  if (config.os && config.os !== 'linux') throw new ImageError('from-image', `the image is for ${config.os}, not linux`)
  const own = guestOf.get(config.architecture ?? '')
  if (!own) {
    throw new ImageError('arch', `the image is for ${config.architecture ?? 'an unknown architecture'}; vmcgi has guests for ${[...guestOf.keys()].join(' and ')}`)
  }
  if (arch && own !== arch) throw new ImageError('arch', `the image is for ${config.architecture} (the ${own} guest), not ${ociArchOf[arch]} (--arch ${arch})`)
  return { arch: own, raw: blob, id: createHash('sha256').update(blob).digest('hex'), config }
}

/** Copies the image of `arch` into an OCI layout at `dir`, tagged `image`, for umoci to unpack. */
export async function copyToLayout(source: Source, arch: GuestArch, dir: string): Promise<void> {
  await skopeo(['copy', '--quiet', '--override-arch', ociArchOf[arch], '--override-os', 'linux', source.text, `oci:${dir}:image`], source)
}

async function skopeo(args: string[], source: Source): Promise<Buffer> {
  const result = await execa('skopeo', args, { encoding: 'buffer', reject: false, timeout: 10 * 60_000 })
  if (result.failed) {
    if ((result as { code?: string }).code === 'ENOENT') {
      throw new ImageError('from-image', 'skopeo is not installed (Debian: apt-get install skopeo)')
    }
    const stderr = Buffer.from(result.stderr).toString('utf8').trim()
    const last = stderr.split('\n').at(-1)?.replace(/^time="[^"]*" level=\w+ msg="?/, '').replace(/"$/, '')
    throw new ImageError('from-image', `${source.text} cannot be read as an image: ${last || result.shortMessage}`)
  }
  return Buffer.from(result.stdout)
}
