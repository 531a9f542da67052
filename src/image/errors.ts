// A problem with what the image build was given: the source, the image, or an
// option. `field` names the option (or what in the image) it is about; the
// command exits with status 2, as vmcgi does for a wrong config.

export class ImageError extends Error {
  readonly field: string

  constructor(field: string, message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'ImageError'
    this.field = field
  }
}
